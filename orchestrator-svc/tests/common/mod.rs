// Each test binary uses only some of these helpers.
#![allow(dead_code)]

pub mod fake_segmenter;
pub mod nats;
pub mod orchestrator;
pub mod ports;
pub mod receiver;
pub mod seaweed;
