//! Attacks (OBJECTIVES.md "Embedding-space attack"): soft-token PGD on input embeddings,
//! prefilling and direct requests.

pub mod embedding;
pub mod pgd;
