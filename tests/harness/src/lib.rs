//! The one test harness of the workspace: services in-process on 127.0.0.1:0 (`server`: start, stop, wait until
//! SERVING), and the real parts tests run against: SeaweedFS as S3 (`seaweed`), NATS JetStream (`nats`), an HTTP
//! callback receiver (`receiver`), a fault-injecting fake segmenter (`fake_segmenter`), a service as a child process
//! that a test can SIGKILL (`process`), a TCP proxy a test cuts off and heals (`partition`), ports for servers told
//! a port number (`ports`), certificates made at test time (`tls`). `segmenter` and `orchestrator` start each
//! service with its test configuration. `jobs` waits for a job's state (WatchJob events first), `status` reads a
//! refusal's field violations.
//!
//! Each test binary uses only some of it; being a library, unused parts cost no `allow(dead_code)`.

pub mod fake_segmenter;
pub mod jobs;
pub mod nats;
pub mod orchestrator;
pub mod partition;
pub mod ports;
pub mod process;
pub mod receiver;
pub mod seaweed;
pub mod segmenter;
pub mod server;
pub mod status;
pub mod tls;
