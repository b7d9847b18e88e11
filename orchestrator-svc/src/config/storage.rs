//! Object storage: the backend and, for R2 and S3, where and with which credentials.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::ConfigError;
use super::secret::Secret;

/// Where objects live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageBackend {
    /// Cloudflare R2 (`https://{R2_ACCOUNT_ID}.r2.cloudflarestorage.com`, region `auto`).
    R2,
    /// Any S3-compatible endpoint (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, region `AWS_REGION`).
    S3,
    /// A directory on this machine (development and tests).
    Local,
}

#[derive(Clone, Debug, Args)]
pub struct StorageArgs {
    /// Object storage: r2 | s3 | local. Default local; r2 when R2_ACCOUNT_ID is set (the seed's only storage).
    #[arg(
        long,
        env = "STORAGE_BACKEND",
        value_enum,
        default_value = "local",
        ignore_case = true
    )]
    pub storage_backend: StorageBackend,
    /// Root directory of the local backend. Default ./.data/storage.
    #[arg(long, env = "LOCAL_STORAGE_DIR", default_value = "./.data/storage")]
    pub local_storage_dir: PathBuf,
    /// Cloudflare account id (r2 only; builds the endpoint URL): the id alone, not a URL or host name.
    #[arg(long, env = "R2_ACCOUNT_ID")]
    pub r2_account_id: Option<String>,
    /// Access key id (r2 and s3).
    #[arg(long, env = "R2_ACCESS_KEY_ID")]
    pub r2_access_key_id: Option<String>,
    /// Secret access key (r2 and s3).
    #[arg(long, env = "R2_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub r2_secret_access_key: Option<Secret>,
    /// Bucket name (r2 and s3).
    #[arg(long, env = "R2_BUCKET_NAME")]
    pub r2_bucket_name: Option<String>,
    /// S3 endpoint URL (s3 only). Falls back to AWS_ENDPOINT_URL, then to the SDK's AWS endpoint.
    #[arg(long, env = "AWS_ENDPOINT_URL_S3")]
    pub s3_endpoint_url: Option<String>,
    /// Generic endpoint URL, used when AWS_ENDPOINT_URL_S3 is unset (s3 only).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// S3 region (s3 only). Default us-east-1.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub aws_region: String,
    /// Timeout of one storage request attempt, in seconds, 1 to 3600. Default 30.
    #[arg(long, env = "STORAGE_TIMEOUT_SEC", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub storage_timeout_sec: u64,
    /// How long start-up keeps asking the object store (r2/s3) whether the credentials and bucket work, in seconds,
    /// 0 to 600: a refusal still standing then fails the start, no answer starts anyway with a warning (a store
    /// starting beside this service answers so for a moment). 0: no check. Default 15.
    #[arg(long, env = "STORAGE_CHECK_SEC", default_value_t = 15, value_parser = clap::value_parser!(u64).range(0..=600))]
    pub storage_check_sec: u64,
    /// How instance masks are stored (docs/api.md): `grid` is the model's soft mask as the segmenter answered it
    /// (288x288 for SAM3) with the rectangle of the photo where it is non-zero, which a client resizes to the photo
    /// (bilinear); `crop` is that full-resolution mask cropped to the rectangle; `full` is the full-resolution mask
    /// of the whole photo, as the seed's worker stored it (for clients that read masks as photo-sized images). The
    /// same values; a 12 MP photo's grids are ~100x fewer bytes than crops and save ~20 % of its CPU. Default grid.
    #[arg(
        long,
        env = "MASK_LAYOUT",
        value_enum,
        default_value = "grid",
        ignore_case = true
    )]
    pub mask_layout: MaskLayout,
}

/// See `StorageArgs::mask_layout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MaskLayout {
    Crop,
    Grid,
    Full,
}

/// The backend to build, validated.
#[derive(Clone, Debug)]
pub enum StorageSettings {
    Local(PathBuf),
    S3(S3Settings),
}

/// Everything the S3 client needs (tests build it directly).
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// None: the SDK's default AWS endpoint for the region.
    pub endpoint_url: Option<String>,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    /// Per attempt; the SDK retries (standard mode) on top.
    pub attempt_timeout: Duration,
    pub max_attempts: u32,
}

fn required(value: &Option<String>, setting: &'static str) -> Result<String, ConfigError> {
    match value.as_deref().map(str::trim) {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => Err(ConfigError::Missing {
            setting,
            reason: "for STORAGE_BACKEND=r2|s3",
        }),
    }
}

/// The account id alone goes into the endpoint's host name. A URL or host name pasted there (`https://<id>.r2...`)
/// would build an endpoint that every request fails on, and start-up's storage check only warns when nothing
/// answers: the service would come up SERVING and fail each item storage_unavailable.
fn r2_account(account: String) -> Result<String, ConfigError> {
    let is_label = account.len() <= 63
        && account
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !account.starts_with('-')
        && !account.ends_with('-');
    if is_label {
        Ok(account)
    } else {
        Err(ConfigError::invalid(
            "R2_ACCOUNT_ID",
            account,
            "is not a Cloudflare account id: give the id alone (letters, digits and '-'; the <id> of \
             https://<id>.r2.cloudflarestorage.com), not a URL or host name",
        ))
    }
}

/// An S3 endpoint as the SDK needs it: an http(s) URL with a host, no query or fragment, trimmed. Anything else
/// (`minio:9000`, a trailing newline from a file) fails every request without an HTTP status, which start-up's
/// storage check takes for a store not up yet: the service would come up SERVING and fail each item
/// storage_unavailable.
fn s3_endpoint(setting: &'static str, raw: &str) -> Result<String, ConfigError> {
    let value = raw.trim();
    let url = reqwest::Url::parse(value).map_err(|e| {
        ConfigError::invalid(
            setting,
            value.to_string(),
            format!("not a URL ({e}): expected http(s)://host[:port]"),
        )
    })?;
    let fault = if !matches!(url.scheme(), "http" | "https") {
        Some("expected an http:// or https:// URL")
    } else if url.host_str().is_none_or(str::is_empty) {
        Some("no host")
    } else if url.query().is_some() || url.fragment().is_some() {
        Some("a query or fragment: object paths are appended to the endpoint")
    } else {
        None
    };
    match fault {
        Some(why) => Err(ConfigError::invalid(setting, value.to_string(), why)),
        None => Ok(value.to_string()),
    }
}

impl StorageArgs {
    /// R2_ACCOUNT_ID set to something (not blank).
    pub fn names_an_r2_account(&self) -> bool {
        self.r2_account_id
            .as_deref()
            .is_some_and(|a| !a.trim().is_empty())
    }

    pub fn settings(&self) -> Result<StorageSettings, ConfigError> {
        if self.storage_backend != StorageBackend::R2 && self.names_an_r2_account() {
            // Given explicitly (an unset STORAGE_BACKEND with R2_ACCOUNT_ID is r2: `Config::from_env`).
            tracing::warn!(
                backend = ?self.storage_backend,
                "R2_ACCOUNT_ID is set but STORAGE_BACKEND is not r2: R2 is not used; set STORAGE_BACKEND=r2 to use it"
            );
        }
        let (endpoint_url, region) = match self.storage_backend {
            StorageBackend::Local => {
                return Ok(StorageSettings::Local(self.local_storage_dir.clone()));
            }
            StorageBackend::R2 => {
                let account = r2_account(required(&self.r2_account_id, "R2_ACCOUNT_ID")?)?;
                (
                    Some(format!("https://{account}.r2.cloudflarestorage.com")),
                    "auto".to_string(),
                )
            }
            StorageBackend::S3 => {
                let endpoint = [
                    ("AWS_ENDPOINT_URL_S3", &self.s3_endpoint_url),
                    ("AWS_ENDPOINT_URL", &self.aws_endpoint_url),
                ]
                .into_iter()
                .find_map(|(setting, value)| Some((setting, value.as_deref()?)))
                .filter(|(_, value)| !value.trim().is_empty())
                .map(|(setting, value)| s3_endpoint(setting, value))
                .transpose()?;
                (endpoint, self.aws_region.clone())
            }
        };
        let secret = self
            .r2_secret_access_key
            .as_ref()
            .map(|s| s.expose().trim().to_string());
        Ok(StorageSettings::S3(S3Settings {
            endpoint_url,
            region,
            bucket: required(&self.r2_bucket_name, "R2_BUCKET_NAME")?,
            access_key_id: required(&self.r2_access_key_id, "R2_ACCESS_KEY_ID")?,
            secret_access_key: required(&secret, "R2_SECRET_ACCESS_KEY")?.into(),
            attempt_timeout: Duration::from_secs(self.storage_timeout_sec.max(1)),
            max_attempts: 4,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r2_with_account(account: &str) -> StorageArgs {
        let mut args = crate::config::Config::defaults().storage;
        args.storage_backend = StorageBackend::R2;
        args.r2_account_id = Some(account.to_string());
        args.r2_access_key_id = Some("key".into());
        args.r2_secret_access_key = Some(Secret::from("secret"));
        args.r2_bucket_name = Some("bucket".into());
        args
    }

    #[test]
    fn an_r2_account_id_builds_the_endpoint() {
        let StorageSettings::S3(s3) = r2_with_account(" 0123456789abcdef0123456789abcdef ")
            .settings()
            .unwrap()
        else {
            panic!("r2 is an S3 backend");
        };
        assert_eq!(
            s3.endpoint_url.as_deref(),
            Some("https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com")
        );
        assert_eq!(s3.region, "auto");
    }

    #[test]
    fn a_url_or_host_name_as_r2_account_id_is_refused_at_startup() {
        for pasted in [
            "https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com",
            "0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com",
            "0123456789abcdef/bucket",
            "-abc",
        ] {
            let err = r2_with_account(pasted).settings().unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        setting: "R2_ACCOUNT_ID",
                        ..
                    }
                ),
                "{pasted}: {err}"
            );
            let shown = format!("{err}: {}", std::error::Error::source(&err).unwrap());
            assert!(shown.contains("not a URL"), "{shown}");
        }
    }

    #[test]
    fn an_s3_endpoint_is_trimmed_and_must_be_an_http_url() {
        let with = |endpoint: &str| {
            let mut args = r2_with_account("unused");
            args.storage_backend = StorageBackend::S3;
            args.r2_account_id = None;
            args.s3_endpoint_url = Some(endpoint.to_string());
            args.settings()
        };
        let Ok(StorageSettings::S3(s3)) = with(" http://seaweedfs:8333\n") else {
            panic!("refused");
        };
        assert_eq!(s3.endpoint_url.as_deref(), Some("http://seaweedfs:8333"));
        for bad in ["minio:9000", "seaweedfs", "ftp://host", "http://host/?x=1"] {
            let err = with(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        setting: "AWS_ENDPOINT_URL_S3",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
    }
}
