//! Scopes: what a token may do. Stored with each API key, carried in JWTs.
//!
//! | scope | grants |
//! | --- | --- |
//! | `jobs:read` | read the tenant's jobs |
//! | `jobs:write` | submit and cancel the tenant's jobs |
//! | `admin` | the two above, and requeue the tenant's jobs: a tenant's admin |
//! | `operator` | platform-wide views (queues across tenants, workers and their hosts); nothing of any tenant's jobs |
//!
//! `admin` is the most a tenant's key gets: nothing a tenant holds shows it
//! other tenants or the platform's machines. `operator` is for the people
//! running Conveyor, given only by `api keys create --scopes operator`.

use std::fmt;

use serde::{Serialize, Serializer};

/// A permission (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    JobsRead,
    JobsWrite,
    Admin,
    Operator,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::JobsRead, Scope::JobsWrite, Scope::Admin, Scope::Operator];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::JobsRead => "jobs:read",
            Self::JobsWrite => "jobs:write",
            Self::Admin => "admin",
            Self::Operator => "operator",
        }
    }

    const fn bit(self) -> u8 {
        match self {
            Self::JobsRead => 1,
            Self::JobsWrite => 2,
            Self::Admin => 4,
            Self::Operator => 8,
        }
    }

    /// The scopes that grant this one: itself, and `admin` for a tenant's own work.
    const fn granted_by(self) -> u8 {
        match self {
            Self::JobsRead | Self::JobsWrite | Self::Admin => self.bit() | Self::Admin.bit(),
            Self::Operator => self.bit(),
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

    /// Whether these scopes grant `scope`; `admin` grants the tenant's scopes, not `operator`.
    pub fn grant(self, scope: Scope) -> bool {
        self.0 & scope.granted_by() != 0
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
#[error("unknown scope {0:?} (known: jobs:read, jobs:write, admin, operator)")]
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
    fn admin_grants_a_tenants_scopes_and_others_only_themselves() {
        let admin = Scopes::of(&[Scope::Admin]);
        assert!([Scope::JobsRead, Scope::JobsWrite, Scope::Admin].into_iter().all(|s| admin.grant(s)));
        assert!(!admin.grant(Scope::Operator), "a tenant's admin sees nothing platform-wide");
        let operator = Scopes::of(&[Scope::Operator]);
        assert!(operator.grant(Scope::Operator) && !operator.grant(Scope::JobsRead) && !operator.grant(Scope::Admin));
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
