//! The shutdown signal both services stop on, and SIGHUP, which they do not stop on.

/// Takes SIGHUP off its default action (terminate, without a drain) where nothing else handles it: logs it and goes
/// on. AUTH_TOKENS_FILE's reload handles it where there is a file (`Authenticator::spawn_reload`). Once installed,
/// the handler stays for the life of the process (tokio never restores the default), even if the task ends.
pub fn ignore_hangups() -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()?;
        Some(tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: no AUTH_TOKENS_FILE to read again; ignored");
            }
        }))
    }
    #[cfg(not(unix))]
    None
}

/// SIGINT or SIGTERM (what Docker and Kubernetes send).
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
