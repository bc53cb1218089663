//! API keys and roles. A caller sends `authorization: Bearer <key>`; the key
//! maps to one role, and each service admits some roles:
//! ChatService: platform, admin; AgentService: agent, admin;
//! MarketingService: marketing, admin; AdminService: admin.
//!
//! Keys are kept only as SHA-256 hashes, compared in constant time, and never
//! logged. With no keys configured every call is admitted, and `serve`
//! refuses to listen anywhere but loopback.

use std::path::Path;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Platform,
    Agent,
    Marketing,
    Admin,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "platform" => Some(Role::Platform),
            "agent" => Some(Role::Agent),
            "marketing" => Some(Role::Marketing),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The roles each service admits.
pub const CHAT: &[Role] = &[Role::Platform, Role::Admin];
pub const AGENT: &[Role] = &[Role::Agent, Role::Admin];
pub const MARKETING: &[Role] = &[Role::Marketing, Role::Admin];
pub const ADMIN: &[Role] = &[Role::Admin];

#[derive(Debug, Clone, Default)]
pub struct Keys {
    entries: Vec<([u8; 32], Role)>,
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Keys {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Keys from a file of `role sha256-hex` lines (`#` comments allowed;
    /// `echo -n KEY | sha256sum` gives the hash) and from `role:key` pairs
    /// separated by commas (the `KEFU_API_KEYS` variable).
    pub fn load(file: Option<&Path>, pairs: Option<&str>) -> Result<Self, String> {
        let mut keys = Keys::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read keys file {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let bad = |why: &str| {
                    format!(
                        "{}:{}: {why}; expected `role sha256-hex`",
                        path.display(),
                        n + 1
                    )
                };
                let mut parts = line.split_whitespace();
                let role = parts
                    .next()
                    .and_then(Role::parse)
                    .ok_or_else(|| bad("unknown role (platform, agent, marketing, admin)"))?;
                let hex_hash = parts.next().ok_or_else(|| bad("missing hash"))?;
                let bytes = hex::decode(hex_hash).map_err(|_| bad("the hash is not hex"))?;
                let hash: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| bad("the hash is not 32 bytes"))?;
                keys.entries.push((hash, role));
            }
        }
        if let Some(pairs) = pairs {
            for (i, pair) in pairs
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .enumerate()
            {
                let (role, key) = pair
                    .split_once(':')
                    .ok_or_else(|| format!("KEFU_API_KEYS entry {} is not `role:key`", i + 1))?;
                let role = Role::parse(role.trim())
                    .ok_or_else(|| format!("KEFU_API_KEYS entry {} has an unknown role", i + 1))?;
                if key.len() < 16 {
                    return Err(format!(
                        "KEFU_API_KEYS entry {} is shorter than 16 characters",
                        i + 1
                    ));
                }
                keys.entries.push((hash_key(key), role));
            }
        }
        Ok(keys)
    }

    /// The role of a presented key, checking every entry so the time taken
    /// does not depend on which one matches.
    pub fn role_of(&self, key: &str) -> Option<Role> {
        let hash = hash_key(key);
        let mut found = None;
        for (h, role) in &self.entries {
            if constant_time_eq(h, &hash) {
                found = Some(*role);
            }
        }
        found
    }

    /// Admits a request whose key has one of `allowed` roles.
    pub fn check<T>(&self, request: &Request<T>, allowed: &[Role]) -> Result<(), Status> {
        if self.is_empty() {
            return Ok(());
        }
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("no API key: send `authorization: Bearer <key>`")
        })?;
        let key = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header must be `Bearer <key>`")
            })?;
        let role = self
            .role_of(key.trim())
            .ok_or_else(|| Status::unauthenticated("unknown API key"))?;
        if allowed.contains(&role) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "the {role:?} role may not call this service"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn roles_are_checked_per_service() {
        let keys = Keys::load(
            None,
            Some("platform:platform-key-0123456, marketing:marketing-key-0123456"),
        )
        .unwrap();
        let platform = request(Some("Bearer platform-key-0123456"));
        assert!(keys.check(&platform, CHAT).is_ok());
        assert_eq!(
            keys.check(&platform, MARKETING).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let marketing = request(Some("Bearer marketing-key-0123456"));
        assert_eq!(
            keys.check(&marketing, CHAT).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            keys.check(&request(None), CHAT).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            keys.check(&request(Some("Bearer nope")), CHAT)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            keys.check(&request(Some("platform-key-0123456")), CHAT)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn keys_files_hold_hashes_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let hash = hex::encode(hash_key("admin-key-0123456789"));
        std::fs::write(&path, format!("# kefu keys\nadmin {hash}\n")).unwrap();
        let keys = Keys::load(Some(&path), None).unwrap();
        assert_eq!(keys.role_of("admin-key-0123456789"), Some(Role::Admin));
        std::fs::write(&path, "owner abcd\n").unwrap();
        assert!(Keys::load(Some(&path), None)
            .unwrap_err()
            .contains("keys:1"));
        assert!(Keys::load(None, Some("admin:short"))
            .unwrap_err()
            .contains("16"));
    }

    #[test]
    fn no_keys_admits_everyone() {
        assert!(Keys::default().check(&request(None), ADMIN).is_ok());
    }
}
