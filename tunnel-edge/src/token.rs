//! The node's own check of a bootstrap token's form, before anything leaves the machine. The
//! server checks it again (and everything else); this only turns typos into a clear local
//! error instead of a refused attempt that counts towards the source's lockout.

/// Lengths of a bootstrap token's two parts, `<id>.<secret>` (as Kubernetes bootstrap tokens).
const TOKEN_ID_LEN: usize = 6;
/// See [`TOKEN_ID_LEN`].
const TOKEN_SECRET_LEN: usize = 16;

/// Check the form of a bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`) before anything is sent:
/// a typo fails here with a message saying what a token looks like, rather than as a refused
/// attempt that counts towards the server's lockout. The message never repeats the token.
pub fn check_token_format(token: &str) -> Result<(), String> {
    let part_ok = |part: &str, len: usize| {
        part.len() == len
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    match token.split_once('.') {
        Some((id, secret)) if part_ok(id, TOKEN_ID_LEN) && part_ok(secret, TOKEN_SECRET_LEN) => {
            Ok(())
        }
        _ => Err(format!(
            "malformed bootstrap token ({} characters): expected <id>.<secret>, {TOKEN_ID_LEN} \
             and {TOKEN_SECRET_LEN} characters of [a-z0-9] (like 07401b.f395accd246ae52d), as \
             printed by `tunnel-server token create`; nothing was sent",
            token.chars().count()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_tokens_are_refused_without_repeating_them() {
        assert!(check_token_format("abcdef.0123456789abcdef").is_ok());
        for bad in [
            "",
            "abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdef0",
            "ABCDEF.0123456789abcdef",
            "abcde.0123456789abcdefg",
            "abcdef.0123456789abcdef\n",
            "abcdef:0123456789abcdef",
            "abcdef.0123456789abcd.f",
        ] {
            let err = check_token_format(bad).unwrap_err();
            assert!(err.starts_with("malformed bootstrap token"), "{err}");
            if !bad.is_empty() {
                assert!(!err.contains(bad), "the message repeats the token: {err}");
            }
        }
    }
}
