//! SIGHUP is what operators send to reload AUTH_TOKENS_FILE (docs/operations.md); a server without that file must
//! not be terminated by it (the signal's default action: no drain, every call in flight cut off). Its own test
//! binary: without the handler, the signal ends the whole process.

use clap::Parser;
use palette_service_kit::{ServeArgs, Serving};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_without_a_tokens_file_leaves_the_process_running() {
    let args = Cli::try_parse_from(["test", "--auth-tokens", "a-token-of-at-least-16"])
        .unwrap()
        .serve;
    let serving = Serving::prepare(&args, &[]).await.unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The default action would have ended the process by now.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(serving);
}
