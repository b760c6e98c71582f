//! Authentication of admin API callers: peer credentials on the Unix socket,
//! a bearer token on loopback TCP.

use http::HeaderValue;
use ring::digest::{digest, SHA256};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use subtle::ConstantTimeEq;

/// Shortest token accepted, in bytes, so that a guess is impractical.
const MIN_TOKEN_LEN: usize = 16;

/// The authenticated client of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Caller {
    /// A process on the Unix socket, from SO_PEERCRED.
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    /// A TCP client that presented the bearer token.
    Token { peer: SocketAddr },
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Unix { uid, gid, pid } => {
                write!(f, "uid={uid} gid={gid}")?;
                match pid {
                    Some(pid) => write!(f, " pid={pid}"),
                    None => write!(f, " pid=unknown"),
                }
            }
            Caller::Token { peer } => write!(f, "token from {peer}"),
        }
    }
}

/// The access policy for Unix socket peers: root, the gateway's own user and
/// members of the socket's group are allowed.
#[derive(Debug, Clone)]
pub(super) struct UnixPolicy {
    pub own_uid: u32,
    /// The group's name as configured, and its gid.
    pub group: Option<(String, u32)>,
}

impl UnixPolicy {
    /// Checks a peer. The group check reads the peer's supplementary groups
    /// from /proc/PID/status when its primary gid does not match.
    ///
    /// NOTE: the kernel records SO_PEERCRED at connect time, but /proc is
    /// read later. If the peer exits and its pid is reused, the groups read
    /// may belong to another process. Comparing the effective uid narrows
    /// this, and the socket's mode 0660 already made the kernel check the
    /// peer's groups at connect time.
    pub fn authorize(&self, uid: u32, gid: u32, pid: Option<i32>) -> Result<(), String> {
        if uid == 0 || uid == self.own_uid {
            return Ok(());
        }
        let Some((name, group_gid)) = &self.group else {
            return Err(format!(
                "uid {uid} may not use the admin API: only root and the gateway's user \
                 (uid {}) may, because no admin socket group is configured",
                self.own_uid
            ));
        };
        if gid == *group_gid {
            return Ok(());
        }
        let denied = |why: String| {
            format!(
                "uid {uid} may not use the admin API: {why}; only root, the gateway's user \
                 (uid {}) and members of group {name} (gid {group_gid}) may",
                self.own_uid
            )
        };
        let Some(pid) = pid.filter(|&p| p > 0) else {
            return Err(denied("the kernel reported no peer pid".to_string()));
        };
        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path)
            .map_err(|e| denied(format!("cannot read {status_path}: {e}")))?;
        let Some((effective_uid, groups)) = parse_proc_status(&status) else {
            return Err(denied(format!("{status_path} has no Uid or Groups line")));
        };
        if effective_uid != uid {
            return Err(denied(format!(
                "pid {pid} now runs as uid {effective_uid}, so its groups cannot be trusted"
            )));
        }
        if groups.contains(group_gid) {
            Ok(())
        } else {
            Err(denied(format!("pid {pid} is not in group {name}")))
        }
    }
}

/// Reads the effective uid and the supplementary groups from the text of
/// /proc/PID/status.
pub(super) fn parse_proc_status(status: &str) -> Option<(u32, Vec<u32>)> {
    let mut effective_uid = None;
    let mut groups = None;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            // Real, effective, saved set and filesystem uid.
            effective_uid = rest.split_whitespace().nth(1)?.parse().ok();
        } else if let Some(rest) = line.strip_prefix("Groups:") {
            let parsed: Result<Vec<u32>, _> = rest.split_whitespace().map(str::parse).collect();
            groups = Some(parsed.ok()?);
        }
    }
    Some((effective_uid?, groups?))
}

/// Resolves a group name or a numeric gid. A numeric gid need not exist in
/// the group database.
pub(super) fn resolve_group(spec: &str) -> io::Result<u32> {
    if let Ok(gid) = spec.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(spec) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "admin socket group {spec:?} does not exist; create it (groupadd {spec}) \
                 or configure a numeric gid"
            ),
        )),
        Err(e) => Err(io::Error::other(format!(
            "cannot look up admin socket group {spec:?}: {e}"
        ))),
    }
}

/// Reads a bearer token file. Rejects a file that another user owns or that
/// group or others may read or write, an empty token, a token shorter than
/// 16 bytes, and a token with whitespace or control characters. Surrounding
/// whitespace is ignored.
pub fn read_token_file(path: &Path) -> io::Result<String> {
    let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
    std::fs::metadata(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read admin token file {}: {e}", path.display()),
        )
    })?;
    crate::config::check_secret_file(path)
        .map_err(|e| invalid(format!("admin token file rejected: {e}")))?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read admin token file {}: {e}", path.display()),
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid(format!(
            "admin token file {} is empty; write a random token into it, for example: \
             head -c 32 /dev/urandom | base64 > {}",
            path.display(),
            path.display()
        )));
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(invalid(format!(
            "the token in admin token file {} has {} bytes, fewer than the minimum of \
             {MIN_TOKEN_LEN}; write a longer random token, for example: \
             head -c 32 /dev/urandom | base64 > {}",
            path.display(),
            token.len(),
            path.display()
        )));
    }
    if token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(invalid(format!(
            "the token in admin token file {} contains whitespace, control or non-ASCII \
             characters; HTTP headers cannot carry them",
            path.display()
        )));
    }
    Ok(token.to_string())
}

/// The reason a TCP request failed bearer authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenRejection {
    Missing,
    NotBearer,
    Invalid,
}

impl TokenRejection {
    pub fn message(self) -> &'static str {
        match self {
            TokenRejection::Missing => {
                "missing Authorization header; send Authorization: Bearer TOKEN with the \
                 token from the admin token file"
            }
            TokenRejection::NotBearer => {
                "the Authorization header is not a bearer token; send Authorization: Bearer TOKEN"
            }
            TokenRejection::Invalid => "invalid bearer token",
        }
    }
}

/// The expected bearer token, kept only as its SHA-256 digest so that the
/// comparison takes the same time whatever the presented token's length.
pub(super) struct BearerToken {
    digest: [u8; 32],
}

impl BearerToken {
    pub fn load(path: &Path) -> io::Result<BearerToken> {
        let token = read_token_file(path)?;
        Ok(BearerToken {
            digest: sha256(token.as_bytes()),
        })
    }

    /// Checks an Authorization header value. The scheme is matched without
    /// regard to case, as RFC 9110 section 11.1 requires.
    pub fn verify(&self, header: Option<&HeaderValue>) -> Result<(), TokenRejection> {
        let header = header.ok_or(TokenRejection::Missing)?;
        let value = header.to_str().map_err(|_| TokenRejection::Invalid)?;
        let (scheme, presented) = value
            .trim()
            .split_once(' ')
            .ok_or(TokenRejection::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(TokenRejection::NotBearer);
        }
        let presented = sha256(presented.trim().as_bytes());
        if bool::from(presented.ct_eq(&self.digest)) {
            Ok(())
        } else {
            Err(TokenRejection::Invalid)
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_parsed() {
        let status = "Name:\tcat\nUid:\t1000\t1001\t1000\t1000\nGid:\t100\t100\t100\t100\n\
                      Groups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(parse_proc_status(status), Some((1001, vec![4, 24, 27])));
    }

    #[test]
    fn proc_status_empty_groups() {
        let status = "Uid:\t0\t0\t0\t0\nGroups:\t\n";
        assert_eq!(parse_proc_status(status), Some((0, vec![])));
    }

    #[test]
    fn proc_status_missing_lines() {
        assert_eq!(parse_proc_status("Name:\tx\n"), None);
        assert_eq!(parse_proc_status("Uid:\t0\t0\t0\t0\n"), None);
    }

    #[test]
    fn policy_allows_root_and_own_uid() {
        let policy = UnixPolicy {
            own_uid: 998,
            group: None,
        };
        assert!(policy.authorize(0, 0, None).is_ok());
        assert!(policy.authorize(998, 998, None).is_ok());
        let denied = policy.authorize(1000, 1000, None).unwrap_err();
        assert!(denied.contains("uid 1000"), "{denied}");
    }

    #[test]
    fn policy_allows_primary_group() {
        let policy = UnixPolicy {
            own_uid: 998,
            group: Some(("ztgate-admin".to_string(), 4242)),
        };
        assert!(policy.authorize(1000, 4242, None).is_ok());
        let denied = policy.authorize(1000, 1000, None).unwrap_err();
        assert!(denied.contains("ztgate-admin"), "{denied}");
    }

    #[test]
    fn caller_display() {
        let unix = Caller::Unix {
            uid: 0,
            gid: 4,
            pid: Some(77),
        };
        assert_eq!(unix.to_string(), "uid=0 gid=4 pid=77");
        let token = Caller::Token {
            peer: "127.0.0.1:4000".parse().expect("address"),
        };
        assert_eq!(token.to_string(), "token from 127.0.0.1:4000");
    }

    #[test]
    fn bearer_scheme_and_token() {
        let token = BearerToken {
            digest: sha256(b"0123456789abcdef"),
        };
        let check =
            |value: &str| token.verify(Some(&HeaderValue::from_str(value).expect("header")));
        assert_eq!(check("Bearer 0123456789abcdef"), Ok(()));
        assert_eq!(check("bearer 0123456789abcdef"), Ok(()));
        assert_eq!(
            check("Bearer 0123456789abcdeX"),
            Err(TokenRejection::Invalid)
        );
        assert_eq!(check("Bearer 0123"), Err(TokenRejection::Invalid));
        assert_eq!(
            check("Basic 0123456789abcdef"),
            Err(TokenRejection::NotBearer)
        );
        assert_eq!(check("0123456789abcdef"), Err(TokenRejection::NotBearer));
        assert_eq!(token.verify(None), Err(TokenRejection::Missing));
    }

    #[test]
    fn group_resolves_name_and_number() {
        assert_eq!(resolve_group("root").expect("root group"), 0);
        assert_eq!(resolve_group("4242").expect("numeric gid"), 4242);
        let missing = resolve_group("no-such-group-ztgate").unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
