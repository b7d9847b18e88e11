//! Defaults the seed's Python worker had that ours keep where the environment shows a seed deployment: ADAPTER
//! unset inside a Runpod worker is runpod, STORAGE_BACKEND unset with R2_ACCOUNT_ID set is r2. And one that follows
//! from the first: JOB_STORE unset with ADAPTER=runpod is memory.

use clap::ArgMatches;

use super::{Adapter, Config, JobStoreKind, StorageBackend};

/// Whether the setting `id` was given (command line or environment), not left at its default.
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches
        .value_source(id)
        .is_some_and(|source| source != clap::parser::ValueSource::DefaultValue)
}

/// ADAPTER as given; when it is not given, runpod inside a Runpod serverless worker (`Config::from_env`).
pub(super) fn adapter(matches: &ArgMatches, config: &Config) -> Adapter {
    let given = given(matches, "adapter");
    let in_runpod = config
        .runpod
        .runpod_webhook_get_job
        .as_deref()
        .is_some_and(|url| !url.trim().is_empty());
    if !given && in_runpod {
        Adapter::Runpod
    } else {
        config.adapter
    }
}

/// STORAGE_BACKEND as given; when it is not given and R2_ACCOUNT_ID is, r2 (`Config::from_env`).
pub(super) fn storage(matches: &ArgMatches, config: &Config) -> StorageBackend {
    let given = given(matches, "storage_backend");
    if !given && config.storage.names_an_r2_account() {
        StorageBackend::R2
    } else {
        config.storage.storage_backend
    }
}

/// JOB_STORE as given; when it is not given and the adapter is runpod, memory (`Config::from_env`). A serverless
/// worker's disk goes with the worker, and Runpod's network volume is no place for the redb file (memory-mapped and
/// locked: local disk only), so `local` would keep a Runpod job's unstarted images for a next start that never
/// reads them, and they would never be called back; `memory` ends them FAILED with their callbacks at shutdown.
pub(super) fn job_store(matches: &ArgMatches, config: &Config) -> JobStoreKind {
    let given = given(matches, "job_store");
    if !given && adapter(matches, config) == Adapter::Runpod {
        JobStoreKind::Memory
    } else {
        config.jobs.job_store
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;

    /// What `pick` decides for the command line `args`, whatever the environment says.
    fn decided<T>(args: &[&str], pick: fn(&ArgMatches, &Config) -> T) -> T {
        let matches = Config::command()
            .mut_args(|arg| arg.env(None::<&str>))
            .try_get_matches_from(args)
            .unwrap();
        let config = Config::from_arg_matches(&matches).unwrap();
        pick(&matches, &config)
    }

    #[test]
    fn adapter_defaults_to_runpod_inside_a_runpod_worker_as_the_seeds_did() {
        let adapter = |args: &[&str]| decided(args, adapter);
        let take = "--runpod-webhook-get-job=https://api.runpod.ai/v2/x/job-take/$ID";
        assert_eq!(adapter(&["x"]), Adapter::Grpc);
        assert_eq!(adapter(&["x", take]), Adapter::Runpod);
        assert_eq!(
            adapter(&["x", take, "--adapter", "grpc"]),
            Adapter::Grpc,
            "given wins"
        );
        assert_eq!(
            adapter(&["x", "--adapter", "queue_pull"]),
            Adapter::QueuePull
        );
    }

    #[test]
    fn storage_defaults_to_r2_when_an_r2_account_is_named_as_the_seeds_did() {
        let backend = |args: &[&str]| decided(args, storage);
        assert_eq!(backend(&["x"]), StorageBackend::Local);
        assert_eq!(
            backend(&["x", "--r2-account-id", "acc"]),
            StorageBackend::R2
        );
        assert_eq!(
            backend(&["x", "--r2-account-id", " "]),
            StorageBackend::Local,
            "blank is unset"
        );
        assert_eq!(
            backend(&["x", "--r2-account-id", "acc", "--storage-backend", "s3"]),
            StorageBackend::S3,
            "given wins"
        );
    }

    #[test]
    fn job_store_defaults_to_memory_in_a_runpod_worker() {
        let kind = |args: &[&str]| decided(args, job_store);
        let take = "--runpod-webhook-get-job=https://api.runpod.ai/v2/x/job-take/$ID";
        assert_eq!(kind(&["x"]), JobStoreKind::Local);
        assert_eq!(kind(&["x", take]), JobStoreKind::Memory);
        assert_eq!(kind(&["x", "--adapter", "runpod"]), JobStoreKind::Memory);
        assert_eq!(
            kind(&["x", take, "--job-store", "local"]),
            JobStoreKind::Local,
            "given wins"
        );
        assert_eq!(
            kind(&["x", take, "--adapter", "grpc"]),
            JobStoreKind::Local,
            "not a Runpod worker when ADAPTER says so"
        );
    }
}
