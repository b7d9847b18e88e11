// Each test binary uses only some of these helpers.
#![allow(dead_code)]

pub mod receiver;
pub mod seaweed;
