//! `VERSION`: version and capability negotiation.
//!
//! The reply keeps the client's major (only 0 is served; any other major closes the connection,
//! as the spec says), answers `min(client minor, 1)`, and always lists the server's limits —
//! including the `migration` object older clients (the `vfio_user` crate) parse. `write_multiple`
//! is answered `true` only when the client offered it, so the capability stays a subset of the
//! proposal. `twin_socket` is not supported and never offered back.

use serde_json::{json, Map, Value};
use vm_memory::ByteValued;

use crate::error::Reject;
use crate::message::MAX_MSG_FDS;
use crate::server::ServerConfig;
use crate::wire::{read_struct, Version};

/// The only major version served.
pub const MAJOR: u16 = 0;
/// The highest minor version served.
pub const MAX_MINOR: u16 = 1;
/// The only DMA page size supported.
pub const PAGE_SIZE: u64 = 4096;

/// What the client asked for, once the version is agreed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// The agreed minor version.
    pub minor: u16,
    /// Largest `count` the client accepts in one server-to-client DMA message.
    pub client_max_data_xfer: u32,
    /// Descriptors the client accepts per message.
    pub client_max_fds: u32,
    /// `REGION_WRITE_MULTI` may be used.
    pub write_multiple: bool,
}

/// The outcome of a `VERSION` command.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Agreed: the reply payload and the session parameters.
    Accept(Vec<u8>, Negotiated),
    /// The major version is not served: close the connection.
    Close(u16),
}

/// Handles the `VERSION` payload.
pub(crate) fn negotiate(payload: &[u8], config: &ServerConfig) -> Result<Outcome, Reject> {
    let version: Version =
        read_struct(payload).ok_or_else(|| Reject::inval("VERSION payload too short"))?;
    if version.major != MAJOR {
        return Ok(Outcome::Close(version.major));
    }
    let caps = parse_caps(&payload[std::mem::size_of::<Version>()..])?;
    let negotiated = Negotiated {
        minor: version.minor.min(MAX_MINOR),
        client_max_data_xfer: caps.max_data_xfer_size,
        client_max_fds: caps.max_msg_fds,
        write_multiple: caps.write_multiple,
    };
    let mut server_caps = json!({
        "max_msg_fds": MAX_MSG_FDS,
        "max_data_xfer_size": config.max_data_xfer_size,
        "max_dma_maps": config.max_dma_maps,
        "pgsizes": PAGE_SIZE,
        "migration": {
            "pgsize": PAGE_SIZE,
            "max_bitmap_size": config.max_bitmap_size,
        },
    });
    if caps.write_multiple {
        if let Some(obj) = server_caps.as_object_mut() {
            obj.insert("write_multiple".into(), Value::Bool(true));
        }
    }
    let text = json!({ "capabilities": server_caps }).to_string();
    let reply_version = Version {
        major: MAJOR,
        minor: negotiated.minor,
    };
    let mut reply = Vec::with_capacity(4 + text.len() + 1);
    reply.extend_from_slice(reply_version.as_slice());
    reply.extend_from_slice(text.as_bytes());
    reply.push(0);
    Ok(Outcome::Accept(reply, negotiated))
}

/// The client's capabilities that matter to the server.
struct ClientCaps {
    max_msg_fds: u32,
    max_data_xfer_size: u32,
    write_multiple: bool,
}

/// Parses the optional NUL-terminated JSON after the version numbers.
fn parse_caps(bytes: &[u8]) -> Result<ClientCaps, Reject> {
    let mut caps = ClientCaps {
        max_msg_fds: 1,
        max_data_xfer_size: 1 << 20,
        write_multiple: false,
    };
    if bytes.is_empty() {
        return Ok(caps);
    }
    let Some(nul) = bytes.iter().position(|&b| b == 0) else {
        return Err(Reject::inval("VERSION data is not NUL-terminated"));
    };
    let text = &bytes[..nul];
    if text.is_empty() {
        return Ok(caps);
    }
    let value: Value = serde_json::from_slice(text)
        .map_err(|e| Reject::inval(format!("VERSION data is not JSON: {e}")))?;
    let Value::Object(top) = value else {
        return Err(Reject::inval("VERSION data is not a JSON object"));
    };
    let Some(c) = top.get("capabilities") else {
        return Ok(caps);
    };
    let Value::Object(c) = c else {
        return Err(Reject::inval("\"capabilities\" is not an object"));
    };
    if let Some(n) = number(c, "max_msg_fds")? {
        caps.max_msg_fds = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(n) = number(c, "max_data_xfer_size")? {
        if n == 0 {
            return Err(Reject::inval("max_data_xfer_size is 0"));
        }
        caps.max_data_xfer_size = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(n) = number(c, "pgsizes")? {
        if n & PAGE_SIZE == 0 {
            return Err(Reject::inval(format!(
                "pgsizes {n:#x} lacks 4 KiB pages, the only size served"
            )));
        }
    }
    number(c, "max_dma_maps")?;
    match c.get("migration") {
        None | Some(Value::Object(_)) => {}
        Some(_) => return Err(Reject::inval("\"migration\" is not an object")),
    }
    match c.get("twin_socket") {
        None | Some(Value::Object(_)) => {}
        Some(_) => return Err(Reject::inval("\"twin_socket\" is not an object")),
    }
    match c.get("write_multiple") {
        None => {}
        Some(Value::Bool(b)) => caps.write_multiple = *b,
        Some(_) => return Err(Reject::inval("\"write_multiple\" is not a boolean")),
    }
    Ok(caps)
}

/// An optional non-negative integer member.
fn number(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, Reject> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| Reject::inval(format!("\"{key}\" is not a non-negative integer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(major: u16, minor: u16, json: Option<&str>) -> Vec<u8> {
        let mut p = Version { major, minor }.as_slice().to_vec();
        if let Some(j) = json {
            p.extend_from_slice(j.as_bytes());
            p.push(0);
        }
        p
    }

    fn accept(p: &[u8]) -> (Value, Negotiated, u16) {
        match negotiate(p, &ServerConfig::default()).unwrap() {
            Outcome::Accept(reply, n) => {
                let v: Version = read_struct(&reply).unwrap();
                assert_eq!(*reply.last().unwrap(), 0);
                let json = serde_json::from_slice(&reply[4..reply.len() - 1]).unwrap();
                (json, n, v.minor)
            }
            Outcome::Close(m) => panic!("closed for major {m}"),
        }
    }

    #[test]
    fn test_version_qemu_0_0_replies_minor_0() {
        let (json, n, minor) = accept(&payload(
            0,
            0,
            Some(
                r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":268435456},"write_multiple":true}}"#,
            ),
        ));
        assert_eq!(minor, 0);
        assert!(n.write_multiple);
        assert_eq!(json["capabilities"]["write_multiple"], Value::Bool(true));
        assert_eq!(json["capabilities"]["max_msg_fds"], 16);
    }

    #[test]
    fn test_version_no_json_defaults() {
        let (json, n, minor) = accept(&payload(0, 5, None));
        assert_eq!(minor, 1);
        assert_eq!(n.client_max_fds, 1);
        assert!(!n.write_multiple);
        assert!(json["capabilities"].get("write_multiple").is_none());
        assert_eq!(json["capabilities"]["migration"]["pgsize"], 4096);
    }

    #[test]
    fn test_version_other_major_closes() {
        assert!(matches!(
            negotiate(&payload(1, 0, None), &ServerConfig::default()),
            Ok(Outcome::Close(1))
        ));
    }

    #[test]
    fn test_version_malformed_json_rejected() {
        for bad in [
            "{",
            "[]",
            r#"{"capabilities":3}"#,
            r#"{"capabilities":{"max_msg_fds":"x"}}"#,
            r#"{"capabilities":{"max_data_xfer_size":0}}"#,
            r#"{"capabilities":{"pgsizes":8192}}"#,
            r#"{"capabilities":{"write_multiple":1}}"#,
        ] {
            assert!(
                negotiate(&payload(0, 1, Some(bad)), &ServerConfig::default()).is_err(),
                "{bad}"
            );
        }
        let mut unterminated = payload(0, 1, None);
        unterminated.extend_from_slice(b"{}");
        assert!(negotiate(&unterminated, &ServerConfig::default()).is_err());
    }
}
