//! Values that must not reach logs: their `Debug` redacts them, so every settings struct can derive `Debug`.

use std::fmt;

/// A credential (API key, shared secret, token); shared with the segmenter through the service kit.
pub use palette_service_kit::Secret;

/// A URL that may carry credentials (`nats://user:pass@host`, `https://host/?token=...`): `Debug` shows it without
/// its user info and query.
#[derive(Clone, PartialEq, Eq)]
pub struct UrlWithCredentials(String);

impl UrlWithCredentials {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UrlWithCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match self.0.find(['?', '#']) {
            Some(q) => format!("{}?<redacted>", &self.0[..q]),
            None => self.0.clone(),
        };
        match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                write!(
                    f,
                    "{:?}",
                    format!("{}<redacted>@{}", &url[..scheme + 3], &url[at + 1..])
                )
            }
            _ => write!(f, "{url:?}"),
        }
    }
}

impl From<String> for UrlWithCredentials {
    fn from(value: String) -> Self {
        UrlWithCredentials(value)
    }
}

impl From<&str> for UrlWithCredentials {
    fn from(value: &str) -> Self {
        UrlWithCredentials(value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        assert_eq!(format!("{:?}", Secret::from("hunter2")), "<redacted>");
        let url = UrlWithCredentials::from("nats://user:pass@host:4222");
        assert_eq!(format!("{url:?}"), "\"nats://<redacted>@host:4222\"");
        assert_eq!(url.expose(), "nats://user:pass@host:4222");
        let url =
            UrlWithCredentials::from("https://u:p4ss@api.example.invalid/hooks?token=t0k@x#f");
        assert_eq!(
            format!("{url:?}"),
            "\"https://<redacted>@api.example.invalid/hooks?<redacted>\""
        );
    }
}
