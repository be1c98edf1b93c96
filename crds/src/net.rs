//! Network addresses in the API: CIDRs that must be written in canonical form, so that what the user
//! wrote is exactly what the kernel is given and what `kubectl get` shows back.

use std::{borrow::Cow, fmt, str::FromStr};

use ipnet::IpNet;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 or IPv6 network in canonical form (`10.0.0.0/24`, `fd00::/64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(IpNet);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not a CIDR: write an address and prefix length such as 10.0.0.0/24 or fd00::/64")]
    Invalid(String),
    #[error("{given:?} has host bits set: write its network address {canonical}")]
    HostBitsSet { given: String, canonical: String },
}

impl Cidr {
    pub fn net(&self) -> IpNet {
        self.0
    }

    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }
}

impl From<IpNet> for Cidr {
    fn from(net: IpNet) -> Self {
        Self(net.trunc())
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let net: IpNet = text.parse().map_err(|_| CidrError::Invalid(text.to_owned()))?;
        let canonical = net.trunc();
        if canonical.to_string() != text {
            return Err(CidrError::HostBitsSet { given: text.to_owned(), canonical: canonical.to_string() });
        }
        Ok(Self(canonical))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The CEL rules shared by every CIDR-valued field: the API server's `isCIDR` plus our canonical-form
/// rule (`isCIDR` alone accepts `10.0.0.1/24`, which would silently mean `10.0.0.0/24`).
/// The message uses `format`, not `+`: the API server estimates the size of `string(<cidr>)` as
/// unbounded, so a concatenation with it exceeds the CRD's CEL cost budget and the CRD is refused.
fn cidr_rules() -> serde_json::Value {
    serde_json::json!([
        {
            "rule": "isCIDR(self)",
            "message": "must be a CIDR: an address and prefix length such as 10.0.0.0/24 or fd00::/64",
        },
        {
            "rule": "!isCIDR(self) || string(cidr(self).masked()) == self",
            "messageExpression": "'has host bits set or is not in canonical form: write %s'.format([string(cidr(self).masked())])",
        },
    ])
}

impl JsonSchema for Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 49,
            "x-kubernetes-validations": cidr_rules(),
        })
    }
}

/// One entry of `nodePortAddresses`, as kube-proxy takes it: a CIDR, or `primary` for the node's
/// primary addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodePortAddress {
    Primary,
    Cidr(Cidr),
}

impl FromStr for NodePortAddress {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "primary" { Ok(Self::Primary) } else { text.parse().map(Self::Cidr) }
    }
}

impl fmt::Display for NodePortAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Primary => f.write_str("primary"),
            Self::Cidr(cidr) => cidr.fmt(f),
        }
    }
}

impl Serialize for NodePortAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodePortAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for NodePortAddress {
    fn schema_name() -> Cow<'static, str> {
        "NodePortAddress".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 49,
            "x-kubernetes-validations": [
                {
                    "rule": "self == 'primary' || isCIDR(self)",
                    "message": "must be 'primary' or a CIDR such as 192.168.0.0/16 or fd00::/64",
                },
                {
                    "rule": "self == 'primary' || !isCIDR(self) || string(cidr(self).masked()) == self",
                    "messageExpression": "'has host bits set or is not in canonical form: write %s'.format([string(cidr(self).masked())])",
                },
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_canonical_cidrs_of_both_families() {
        for text in
            ["10.0.0.0/24", "0.0.0.0/0", "192.168.1.1/32", "fd00::/64", "2001:db8::/32", "::/0", "::1/128"]
        {
            let cidr: Cidr = text.parse().expect(text);
            assert_eq!(cidr.to_string(), text);
        }
    }

    #[test]
    fn refuses_invalid_and_non_canonical_cidrs() {
        for text in ["10.0.0.0", "10.0.0.0/33", "10.0.0.256/24", "fd00::/129", "fe80::/10%eth0", "", "x/24"] {
            assert!(matches!(text.parse::<Cidr>(), Err(CidrError::Invalid(_))), "{text}");
        }
        assert_eq!(
            "10.0.0.1/24".parse::<Cidr>(),
            Err(CidrError::HostBitsSet { given: "10.0.0.1/24".into(), canonical: "10.0.0.0/24".into() })
        );
        assert!(matches!("2001:DB8::/32".parse::<Cidr>(), Err(CidrError::HostBitsSet { .. })));
    }

    #[test]
    fn node_port_address_takes_primary_or_cidr() {
        assert_eq!("primary".parse(), Ok(NodePortAddress::Primary));
        assert!(matches!("10.0.0.0/8".parse(), Ok(NodePortAddress::Cidr(_))));
        assert!("Primary".parse::<NodePortAddress>().is_err());
    }
}
