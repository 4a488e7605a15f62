//! Random input on a fresh connection must neither panic the server nor stop it serving the
//! next, well-behaved client.

#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vfio_user::Client;

/// Sends `bytes` on a fresh connection, closes the sending side, and drains the server's
/// answers until it closes too.
fn throw(fx: &Fixture, bytes: &[u8]) {
    let mut s = UnixStream::connect(fx.path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The server may close first (e.g. an oversized message): write errors are expected.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("server neither answered nor closed: {e}"),
        }
    }
}

/// A well-behaved client is served completely afterwards.
fn check_still_serving(fx: &Fixture) {
    let mut client = Client::new(fx.path()).expect("a good client is served");
    let mut id = [0u8; 4];
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x1234_1af4);
    client.shutdown().unwrap();
    drop(client);
    let stats = fx.server().stats();
    assert_eq!(stats.panics, 0);
    assert!(fx.server().is_running());
}

fn version_prefix() -> Vec<u8> {
    let payload = B::new()
        .u16(0)
        .u16(0)
        .bytes(br#"{"capabilities":{"write_multiple":true}}"#)
        .bytes(&[0])
        .done();
    Raw::frame(1, VERSION, 0, &payload)
}

/// A well-framed message with a random command, flags and payload.
fn framed() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        prop_oneof![0u16..20, any::<u16>()],
        prop_oneof![Just(0u32), Just(NO_REPLY), any::<u32>()],
        prop::collection::vec(any::<u8>(), 0..96),
    )
        .prop_map(|(id, cmd, flags, payload)| Raw::frame(id, cmd, flags, &payload))
}

/// Plausible messages: right command, structured payload with random fields.
fn structured() -> impl Strategy<Value = Vec<u8>> {
    (
        1u16..19,
        prop::collection::vec(
            prop_oneof![
                any::<u32>().prop_map(|v| v.to_ne_bytes().to_vec()),
                (0u32..64).prop_map(|v| v.to_ne_bytes().to_vec()),
                (0u64..0x20000).prop_map(|v| v.to_ne_bytes().to_vec()),
            ],
            0..8,
        ),
    )
        .prop_map(|(cmd, fields)| Raw::frame(7, cmd, 0, &fields.concat()))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn test_fuzz_random_bytes_server_survives(
        negotiate in any::<bool>(),
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let fx = Fixture::new();
        let mut stream = if negotiate { version_prefix() } else { Vec::new() };
        stream.extend_from_slice(&bytes);
        throw(&fx, &stream);
        check_still_serving(&fx);
    }

    #[test]
    fn test_fuzz_framed_messages_server_survives(
        messages in prop::collection::vec(prop_oneof![framed(), structured()], 1..24),
        truncate in any::<prop::sample::Index>(),
        cut in any::<bool>(),
    ) {
        let fx = Fixture::new();
        let mut stream = version_prefix();
        for m in &messages {
            stream.extend_from_slice(m);
        }
        if cut {
            let keep = version_prefix().len() + truncate.index(stream.len() - version_prefix().len());
            stream.truncate(keep);
        }
        throw(&fx, &stream);
        check_still_serving(&fx);
    }
}

#[test]
fn test_fuzz_many_connections_one_server() {
    // The same server through a sequence of hostile connections and good clients.
    let fx = Fixture::new();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strat = prop::collection::vec(prop_oneof![framed(), structured()], 1..16);
    for _ in 0..32 {
        let msgs = strat.new_tree(&mut runner).unwrap().current();
        let mut stream = version_prefix();
        for m in &msgs {
            stream.extend_from_slice(m);
        }
        throw(&fx, &stream);
        check_still_serving(&fx);
    }
    let stats = fx.server().stats();
    assert_eq!(stats.refused, 0);
    // The hostile input went deep: many messages parsed, many refused.
    assert!(stats.messages > 100, "{stats:?}");
    assert!(stats.errors > 10, "{stats:?}");
}
