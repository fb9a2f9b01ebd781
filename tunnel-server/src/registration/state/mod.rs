//! The shared control state of the registration API and the edge listener: tokens, their
//! use, certified keys, the identity registry, revocations and live sessions, behind one
//! [`StateStore`] with a backend per file ([`file`] today; a shared store for replicas).
//! Joins and renewals are single decisions of the backend ([`decision`]); the data path
//! reads only in-memory views ([`revocation::RevocationList`], [`identities::IdentityStore`]),
//! so it never waits on the store.
//!
//! The file backend's files: the token file (operator-owned,
//! reloaded when its mtime/size/inode changes; [`tokens`]) and, beside it,
//! `<file>.usage.json` (server-owned; [`usage`]): how often each token was used and the public
//! keys already certified; and `<file>.identities.json` (server-owned; [`identities`]): which
//! node holds which name, IPs and current certificate. [`store`] admits joins against the
//! first two. Every file is written
//! atomically (temporary file + rename), mode 0600 ([`files`]).

pub mod config;
pub mod decision;
pub mod etcd;
pub mod file;
pub mod files;
pub mod identities;
pub mod revocation;
pub mod sessions;
pub mod store;
pub mod tokens;
pub mod usage;

mod backend;

pub use backend::StateStore;
pub use config::StateConfig;
pub use decision::{Declined, Issued, JoinClaim, Joined, RenewClaim, StateError};
pub use files::{unix_now, StoreError};
pub use store::{Admission, Refusal, TokenStore};
pub use tokens::{
    create, glob_match, list, revoke, BootstrapToken, MalformedToken, NodePool, TokenFile,
    TokenRecord, TokenSpec, DEFAULT_TOKEN_TTL, TOKEN_ID_LEN, TOKEN_SECRET_LEN,
};
pub use usage::Usage;
