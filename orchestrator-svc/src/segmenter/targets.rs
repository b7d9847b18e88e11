//! SEGMENTER_URL: which replicas to resolve, and under what name to call them.

use http::Uri;

/// Why SEGMENTER_URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no URL given")]
    Empty,
    #[error("{entry:?}: expected {expected}")]
    Malformed {
        entry: String,
        expected: &'static str,
    },
    #[error("{entry:?}: a port is required")]
    NoPort { entry: String },
    #[error("{entry:?}: no host")]
    NoHost { entry: String },
    #[error("{entry:?}")]
    Uri {
        entry: String,
        #[source]
        source: http::uri::InvalidUri,
    },
}

/// One entry of SEGMENTER_URL: where to resolve and what to call the replicas (`:authority`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Target {
    pub(super) fn origin(&self) -> String {
        if self.host.contains(':') {
            format!("{}://[{}]:{}", self.scheme, self.host, self.port)
        } else {
            format!("{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

/// SEGMENTER_URL: one or more comma-separated `http://host:port`, `https://host[:port]` (443 by default) or
/// `dns:///host:port` (gRPC naming; an authority between `dns://` and the third slash is ignored). A host name is
/// resolved to all its addresses (a Kubernetes headless Service: one per ready Pod), and every address is a
/// replica.
pub fn parse_targets(urls: &str) -> Result<Vec<Target>, TargetError> {
    let mut targets = Vec::new();
    for entry in urls.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let target = if let Some(rest) = entry.strip_prefix("dns:") {
            let rest = match rest.strip_prefix("//") {
                Some(after) => after.split_once('/').map(|(_, name)| name).ok_or_else(|| {
                    TargetError::Malformed {
                        entry: entry.to_string(),
                        expected: "dns:///host:port",
                    }
                })?,
                None => rest,
            };
            let uri: Uri = format!("http://{rest}")
                .parse()
                .map_err(|source| TargetError::Uri {
                    entry: entry.to_string(),
                    source,
                })?;
            let port = uri.port_u16().ok_or_else(|| TargetError::NoPort {
                entry: entry.to_string(),
            })?;
            Target {
                scheme: "http".into(),
                host: host_of(&uri, entry)?,
                port,
            }
        } else {
            let uri: Uri = entry.parse().map_err(|source| TargetError::Uri {
                entry: entry.to_string(),
                source,
            })?;
            let scheme = match uri.scheme_str() {
                Some(s @ ("http" | "https")) => s.to_string(),
                _ => {
                    return Err(TargetError::Malformed {
                        entry: entry.to_string(),
                        expected: "http://host:port, https://host[:port] or dns:///host:port",
                    });
                }
            };
            let port = uri
                .port_u16()
                .unwrap_or(if scheme == "https" { 443 } else { 80 });
            Target {
                host: host_of(&uri, entry)?,
                scheme,
                port,
            }
        };
        targets.push(target);
    }
    if targets.is_empty() {
        return Err(TargetError::Empty);
    }
    Ok(targets)
}

fn host_of(uri: &Uri, entry: &str) -> Result<String, TargetError> {
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| TargetError::NoHost {
            entry: entry.to_string(),
        })?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_targets() {
        let t = parse_targets("http://seg:50051").unwrap();
        assert_eq!(
            t,
            vec![Target {
                scheme: "http".into(),
                host: "seg".into(),
                port: 50051
            }]
        );
        let t = parse_targets(
            " http://10.0.0.1:1, dns:///seg.ns.svc:50051 ,dns://8.8.8.8/x:2,http://[::1]:3",
        )
        .unwrap();
        let hosts: Vec<(&str, u16)> = t.iter().map(|t| (t.host.as_str(), t.port)).collect();
        assert_eq!(
            hosts,
            vec![("10.0.0.1", 1), ("seg.ns.svc", 50051), ("x", 2), ("::1", 3)]
        );
        assert_eq!(t[3].origin(), "http://[::1]:3");
        assert_eq!(parse_targets("http://seg").unwrap()[0].port, 80);
        assert!(parse_targets("dns:///seg").is_err(), "dns needs a port");
        assert!(parse_targets("ftp://seg:1").is_err());
        assert!(parse_targets(" , ").is_err());
    }
}
