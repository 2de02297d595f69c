//! Cross-crate tests live in `tests/`; this crate has no code of its own. It must not share
//! code with what it checks: references here are written from the definitions, not copied.
