//! Orchestrator (see issue: orchestrator). Placeholder until the service lands.
