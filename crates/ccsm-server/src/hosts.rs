//! Which `Host` names a server answers to (a loopback server: loopback names only, unless told
//! more), and what a refused request is told.

use std::net::IpAddr;

/// The names a loopback server answers to unless told more (`--allowed-host`).
const LOOPBACK_NAMES: [&str; 4] = ["localhost", "127.0.0.1", "[::1]", "::1"];

/// Which `Host` names requests may be addressed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPolicy {
    Any,
    /// Only these (lowercase, without port) and `*.localhost`; `loopback`: the server listens on
    /// loopback (which is why it refuses other names).
    Only {
        names: Vec<String>,
        loopback: bool,
    },
}

impl HostPolicy {
    /// A server bound to loopback answers only to loopback names and `extra`: a web page's script can
    /// make a browser send requests to 127.0.0.1 under its own name (DNS rebinding) and read the
    /// answers, and the `Host` is where that shows. Bound elsewhere it answers any name, unless
    /// `extra` lists some. `*` in `extra` allows any.
    pub fn for_bind(ip: IpAddr, extra: &[String]) -> Self {
        if extra.iter().any(|h| h == "*") {
            return HostPolicy::Any;
        }
        if !ip.is_loopback() && extra.is_empty() {
            return HostPolicy::Any;
        }
        let mut names: Vec<String> = LOOPBACK_NAMES.iter().map(|s| s.to_string()).collect();
        names.extend(extra.iter().map(|h| normalise(h)));
        HostPolicy::Only { names, loopback: ip.is_loopback() }
    }

    pub fn allows(&self, host: &str) -> bool {
        match self {
            HostPolicy::Any => true,
            HostPolicy::Only { names, .. } => {
                let host = normalise(host);
                names.contains(&host) || host.ends_with(".localhost")
            }
        }
    }

    /// Why a request addressed to `host` is refused, and what the operator can do.
    pub(crate) fn refusal(&self, host: &str) -> String {
        let shown: String = host.chars().filter(|c| !c.is_control()).take(200).collect();
        let (extra, loopback) = match self {
            HostPolicy::Only { names, loopback } => (names[LOOPBACK_NAMES.len()..].join(", "), *loopback),
            HostPolicy::Any => (String::new(), false),
        };
        if loopback {
            let names = if extra.is_empty() { "localhost, 127.0.0.1 and [::1]".to_owned() } else { format!("loopback names and {extra}") };
            format!(
                "requests addressed to '{shown}' are refused: this server listens on loopback and answers to {names} only (a web page could otherwise reach it through DNS rebinding); start it with --allowed-host NAME to answer to NAME"
            )
        } else {
            format!("requests addressed to '{shown}' are refused: this server answers only to the names --allowed-host gives ({extra}) and loopback names")
        }
    }
}

/// A `Host` value without its port, lowercase, without a trailing dot.
fn normalise(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    let name = if host.starts_with('[') {
        // [v6]:port
        host.split_inclusive(']').next().unwrap_or(&host).to_owned()
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or(&host).to_owned()
    } else {
        host
    };
    name.trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_server_answers_to_loopback_names_only() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let open: IpAddr = "0.0.0.0".parse().unwrap();
        let policy = HostPolicy::for_bind(loopback, &[]);
        for ok in ["localhost", "LOCALHOST:8080", "127.0.0.1:80", "[::1]:8080", "::1", "app.localhost", "localhost."] {
            assert!(policy.allows(ok), "{ok}");
        }
        for bad in ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.evil.example", "[::2]:80"] {
            assert!(!policy.allows(bad), "{bad}");
        }
        assert!(HostPolicy::for_bind(loopback, &["Box.lan".into()]).allows("box.lan:8080"));
        assert_eq!(HostPolicy::for_bind(loopback, &["*".into()]), HostPolicy::Any);
        assert_eq!(HostPolicy::for_bind(open, &[]), HostPolicy::Any);
        assert!(!HostPolicy::for_bind(open, &["api.example".into()]).allows("other.example"));
    }

    #[test]
    fn a_refusal_says_loopback_only_on_loopback() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let open: IpAddr = "0.0.0.0".parse().unwrap();
        let local = HostPolicy::for_bind(loopback, &[]).refusal("evil.example");
        assert!(local.contains("listens on loopback") && local.contains("--allowed-host NAME"), "{local}");
        let named = HostPolicy::for_bind(loopback, &["box.lan".into()]).refusal("evil.example");
        assert!(named.contains("listens on loopback") && named.contains("box.lan"), "{named}");
        let public = HostPolicy::for_bind(open, &["api.example".into()]).refusal("other.example");
        assert!(
            !public.contains("listens on loopback") && public.contains("api.example") && public.contains("'other.example'"),
            "{public}"
        );
    }
}
