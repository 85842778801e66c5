//! Attacks (OBJECTIVES.md "Embedding-space attack"): soft-token PGD on input embeddings,
//! prefilling and direct requests.

pub mod commands;
pub mod embedding;
pub mod judge;
pub mod pgd;
