//! The arguments of the multi-file commands, one grammar for the command line and `xfer
//! shell`: they live with the code that runs them so that the command line depends on the
//! transfers and not the other way round.

use std::path::PathBuf;

/// Arguments of `upload`, shared by the command line and `xfer shell`.
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// Local files
    #[arg(required = true)]
    pub local: Vec<PathBuf>,
    /// Remote folder to upload into [default: your root]
    #[arg(long, value_name = "REMOTE_DIR")]
    pub to: Option<String>,
    /// Upload folders and everything in them
    #[arg(short, long)]
    pub recursive: bool,
    /// Send every file whole, even if the server kept part of it from an interrupted upload
    #[arg(long)]
    pub no_resume: bool,
}

/// Arguments of `download`, shared by the command line and `xfer shell`.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// Remote files
    #[arg(required = true)]
    pub remote: Vec<String>,
    /// Local folder to download into [default: the current folder]
    #[arg(long, value_name = "LOCAL_DIR")]
    pub to: Option<PathBuf>,
    /// Download folders and everything in them
    #[arg(short, long)]
    pub recursive: bool,
    /// Fetch every file whole, even if a NAME.part from an interrupted download is there
    #[arg(long)]
    pub no_resume: bool,
}

/// Arguments of `delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Remote paths
    #[arg(required = true)]
    pub remote: Vec<String>,
}
