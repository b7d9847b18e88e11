//! Where job state outlives the process (see docs/architecture.md, "Job state").

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum JobStoreKind {
    /// A redb file on local disk: a restarted orchestrator resumes its unfinished jobs.
    Local,
    /// Nothing kept: a restart loses every job (unstarted items fail at shutdown so callers can resubmit).
    Memory,
}

#[derive(Clone, Debug, Args)]
pub struct JobStoreArgs {
    /// Where jobs are kept across restarts: local (default; a redb file at JOB_STORE_PATH, one orchestrator per
    /// file: a restarted orchestrator resumes its unfinished jobs and resends unsettled callbacks) | memory (nothing
    /// kept: a restart loses every job).
    #[arg(
        long,
        env = "JOB_STORE",
        value_enum,
        default_value = "local",
        ignore_case = true
    )]
    pub job_store: JobStoreKind,
    /// JOB_STORE=local: the store's file, created with its directory; on local disk only (the file is memory-mapped
    /// and locked). Default ./.data/jobs.redb.
    #[arg(long, env = "JOB_STORE_PATH", default_value = "./.data/jobs.redb")]
    pub job_store_path: PathBuf,
}
