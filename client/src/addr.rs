//! Server addresses as users type them: `HOST`, `HOST:PORT`, `[V6]:PORT`, `V6`, and
//! `USER@` in front of any of them for login.

use xfer_proto::DEFAULT_PORT;

use crate::error::ClientError;

/// A server's host and port; its `Display` form (`host:port`, IPv6 in brackets) is the key
/// under which pins and sessions are stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    /// Host name or IP address (no brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl ServerAddr {
    /// Parses `HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT` or a bare IPv6 address.
    pub fn parse(text: &str) -> Result<ServerAddr, ClientError> {
        let bad = |why: &str| ClientError::Usage(format!("invalid server address `{text}`: {why}"));
        let text = text.trim();
        if text.is_empty() {
            return Err(bad("it is empty"));
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| bad("missing `]`"))?;
            match after {
                "" => (host, None),
                p if p.starts_with(':') => (host, Some(&p[1..])),
                _ => return Err(bad("unexpected text after `]`")),
            }
        } else if text.matches(':').count() > 1 {
            (text, None)
        } else if let Some((h, p)) = text.split_once(':') {
            (h, Some(p))
        } else {
            (text, None)
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@'))
        {
            return Err(bad("the host contains a character hosts cannot have"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
        };
        Ok(ServerAddr {
            host: host.to_string(),
            port,
        })
    }

    /// Parses `USER@HOST[:PORT]`; the user is everything before the last `@`.
    pub fn parse_login(text: &str) -> Result<(String, ServerAddr), ClientError> {
        let (user, server) = text.rsplit_once('@').ok_or_else(|| {
            ClientError::Usage(format!(
                "`{text}` should be USER@HOST[:PORT], for example alice@127.0.0.1:7443"
            ))
        })?;
        if user.is_empty() {
            return Err(ClientError::Usage(format!("no user name in `{text}`")));
        }
        Ok((user.to_string(), ServerAddr::parse(server)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_parse_and_display_canonically() {
        let cases = [
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("127.0.0.1", "127.0.0.1:7443"),
            ("files.example.org", "files.example.org:7443"),
            ("[::1]:9000", "[::1]:9000"),
            ("[::1]", "[::1]:7443"),
            ("::1", "[::1]:7443"),
        ];
        for (input, shown) in cases {
            assert_eq!(
                ServerAddr::parse(input).unwrap().to_string(),
                shown,
                "{input}"
            );
        }
    }

    #[test]
    fn bad_addresses_are_usage_errors() {
        for bad in [
            "",
            ":80",
            "host:0",
            "host:99999",
            "host:x",
            "[::1",
            "a b",
            "[::1]x",
        ] {
            let err = ServerAddr::parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn login_splits_on_the_last_at() {
        let (u, s) = ServerAddr::parse_login("alice@127.0.0.1:7443").unwrap();
        assert_eq!(
            (u.as_str(), s.to_string().as_str()),
            ("alice", "127.0.0.1:7443")
        );
        assert!(ServerAddr::parse_login("127.0.0.1").is_err());
        assert!(ServerAddr::parse_login("@host").is_err());
    }
}
