//! Rule engine (see issue: rules). Placeholder until the engine lands.
