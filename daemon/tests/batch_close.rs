//! A connection that ends without `Commit` leaves no staged file behind by the time the
//! daemon has finished with it, even when `Put`s were still being staged as it closed.
//! (Found by the `session` fuzz target: stagings running when the connection ended deleted
//! their files only later, after the connection's task had returned.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xfer_proto::frame::encode_frame;
use xfer_proto::{Connection, PROTOCOL_VERSION, Request, Role};
use xferd::accounts::UsersFile;
use xferd::config::Config;
use xferd::server::Daemon;

#[test]
fn puts_staging_when_the_connection_ends_are_deleted_before_it_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("xferd.toml");
    xferd::init::init(&xferd::init::InitOptions {
        config: config_path.clone(),
        listen: Some("127.0.0.1:0".into()),
        ..Default::default()
    })
    .unwrap();
    let config = Config::load(&config_path).unwrap();
    let mut users = UsersFile::default();
    users.add("alice", Role::User, "alice-pw-123").unwrap();
    users.save(&config.users_file).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let staging_dir = config.root.join(xferd::storage::local::TMP_DIR);
    // Each round ends the connection right behind a burst of `Put`s, so some are still
    // being staged on the blocking pool when the client's end of the stream closes.
    for round in 0..20u32 {
        let state = rt
            .block_on(Daemon::load(config.clone()))
            .unwrap()
            .state()
            .clone();
        let (_, generation) = state.accounts.lookup("alice").unwrap();
        let token = state.sessions.create("alice", generation, "test").0;
        let mut wire = Vec::new();
        encode_frame(
            &Request::Hello {
                version: PROTOCOL_VERSION,
                agent: "test".into(),
            },
            &mut wire,
        )
        .unwrap();
        encode_frame(&Request::Authenticate { token }, &mut wire).unwrap();
        for i in 0..12 {
            let body = vec![round as u8; 4096 + i];
            encode_frame(
                &Request::Put {
                    path: format!("r{round}/f{i}"),
                    size: body.len() as u64,
                    digest: *blake3::hash(&body).as_bytes(),
                },
                &mut wire,
            )
            .unwrap();
            wire.extend_from_slice(&body);
        }
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let conn = Connection::new(server, Duration::from_secs(10));
            let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
            let serve = xferd::handler::serve_session(state, conn, peer, Instant::now());
            let talk = async move {
                client.write_all(&wire).await.unwrap();
                client.shutdown().await.unwrap();
                let mut out = Vec::new();
                let _ = client.read_to_end(&mut out).await;
            };
            tokio::join!(serve, talk);
        });
        let left: Vec<_> = std::fs::read_dir(&staging_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(
            left.is_empty(),
            "round {round}: staged files left after the connection ended: {left:?}"
        );
        assert!(
            !config
                .root
                .join("alice")
                .join(format!("r{round}"))
                .join("f0")
                .exists(),
            "nothing was committed"
        );
    }
}
