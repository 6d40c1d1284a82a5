//! Scopes: what a token may do. `jobs:read`, `jobs:write`, and `admin`,
//! which grants the other two. Stored with each API key, carried in JWTs.

use std::fmt;

use serde::{Serialize, Serializer};

/// A permission. `admin` includes the other two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    JobsRead,
    JobsWrite,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::JobsRead, Scope::JobsWrite, Scope::Admin];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::JobsRead => "jobs:read",
            Self::JobsWrite => "jobs:write",
            Self::Admin => "admin",
        }
    }

    const fn bit(self) -> u8 {
        match self {
            Self::JobsRead => 1,
            Self::JobsWrite => 2,
            Self::Admin => 4,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == name)
    }
}

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub fn of(scopes: &[Scope]) -> Self {
        Self(scopes.iter().fold(0, |bits, scope| bits | scope.bit()))
    }

    /// Whether these scopes grant `scope`; `admin` grants everything.
    pub fn grant(self, scope: Scope) -> bool {
        self.0 & (scope.bit() | Scope::Admin.bit()) != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        Scope::ALL.into_iter().filter(|s| self.0 & s.bit() != 0).map(Scope::as_str).collect()
    }

    /// Parses names, ignoring unknown ones (a JWT may carry scopes of other services).
    pub fn lenient<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self::of(&names.into_iter().filter_map(Scope::parse).collect::<Vec<_>>())
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.names().serialize(serializer)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown scope {0:?} (known: jobs:read, jobs:write, admin)")]
pub struct UnknownScope(String);

impl TryFrom<Vec<String>> for Scopes {
    type Error = UnknownScope;

    fn try_from(names: Vec<String>) -> Result<Self, Self::Error> {
        let scopes: Result<Vec<_>, _> =
            names.iter().map(|n| Scope::parse(n).ok_or_else(|| UnknownScope(n.clone()))).collect();
        Ok(Self::of(&scopes?))
    }
}

impl std::str::FromStr for Scopes {
    type Err = UnknownScope;

    /// Comma-separated names, as `api keys create --scopes` takes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect::<Vec<_>>().try_into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_grants_every_scope_and_others_only_themselves() {
        let admin = Scopes::of(&[Scope::Admin]);
        assert!(Scope::ALL.into_iter().all(|s| admin.grant(s)));
        let read = Scopes::of(&[Scope::JobsRead]);
        assert!(read.grant(Scope::JobsRead) && !read.grant(Scope::JobsWrite) && !read.grant(Scope::Admin));
    }

    #[test]
    fn scopes_parse_from_a_comma_list_and_refuse_unknown_names() {
        let scopes: Scopes = "jobs:read, jobs:write".parse().expect("valid");
        assert_eq!(scopes.names(), ["jobs:read", "jobs:write"]);
        assert!("jobs:read,jobs:delete".parse::<Scopes>().is_err());
        assert_eq!(Scopes::lenient(["jobs:read", "openid"]).names(), ["jobs:read"]);
    }
}
