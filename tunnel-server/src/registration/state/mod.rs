//! The registration API's state on disk. Two files: the token file (operator-owned,
//! reloaded when its mtime/size/inode changes; [`tokens`]) and, beside it,
//! `<file>.usage.json` (server-owned; [`usage`]): how often each token was used and the public
//! keys already certified; and `<file>.identities.json` (server-owned; [`identities`]): which
//! node holds which name, IPs and current certificate. [`store`] admits joins against the
//! first two. Every file is written
//! atomically (temporary file + rename), mode 0600 ([`files`]).

pub mod files;
pub mod identities;
pub mod store;
pub mod tokens;
pub mod usage;

pub use files::{unix_now, StoreError};
pub use store::{Admission, Refusal, TokenStore};
pub use tokens::{
    create, glob_match, list, revoke, BootstrapToken, MalformedToken, NodePool, TokenFile,
    TokenRecord, DEFAULT_TOKEN_TTL, TOKEN_ID_LEN, TOKEN_SECRET_LEN,
};
pub use usage::Usage;
