//! Dynamo's router must hash the blocks of Arbor's KV events exactly as it hashes a request
//! of the same namespace, or KV-aware routing silently stops working for that tenant. These
//! tests put Arbor's encoded events through Dynamo's own event reader (`zmq_wire`) and compare
//! the block hashes it indexes with the ones its router computes for a request.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use arbor_dynamo::CacheNamespaces;
use arbor_engine::KvEvent;
use arbor_server::kv_events::{encode_batch, NamespaceKeys};
use dynamo_kv_router::protocols::{
    compute_block_hash_for_seq, BlockHashOptions, KvCacheEventData, LocalBlockHash,
    WorkerWithDpRank,
};
use dynamo_kv_router::zmq_wire::{convert_event, decode_event_batch};

const BLOCK: usize = 16;

/// Three pages of a prompt, as the engine logs them.
fn stored(namespace: u64, tokens: &[u32]) -> KvEvent {
    KvEvent::Stored {
        namespace,
        parent: None,
        hashes: (0..tokens.len() / BLOCK).map(|i| 1000 + i as u64).collect(),
        tokens: tokens.to_vec(),
    }
}

/// The block hashes Dynamo's router indexes for an encoded Arbor event.
fn indexed(event: KvEvent, keys: &NamespaceKeys) -> Vec<LocalBlockHash> {
    let payload = encode_batch(0.0, &[event], BLOCK, keys);
    let batch = decode_event_batch(&payload).expect("Dynamo reads Arbor's batch");
    assert_eq!(batch.events.len(), 1);
    let raw = batch.events.into_iter().next().unwrap();
    let worker = WorkerWithDpRank {
        worker_id: 1,
        dp_rank: 0,
    };
    let warnings = Arc::new(AtomicU32::new(0));
    let placed = convert_event(raw, 0, BLOCK as u32, worker, &warnings, None, None)
        .expect("a stored event is indexed");
    let KvCacheEventData::Stored(data) = placed.event.data else {
        panic!("expected a stored event, got {:?}", placed.event.data);
    };
    data.blocks.iter().map(|b| b.tokens_hash).collect()
}

/// The block hashes Dynamo's router computes for a request.
fn requested(tokens: &[u32], cache_namespace: Option<&str>) -> Vec<LocalBlockHash> {
    let options = BlockHashOptions {
        cache_namespace,
        ..Default::default()
    };
    compute_block_hash_for_seq(tokens, BLOCK as u32, options)
}

fn prompt() -> Vec<u32> {
    (0..3 * BLOCK as u32).map(|i| 7 + i * 13 % 5000).collect()
}

#[test]
fn a_tenants_events_hash_as_its_requests_do() {
    let namespaces = Arc::new(CacheNamespaces::default());
    let n = namespaces.clone();
    let keys = NamespaceKeys::new(move |ns| n.event_key(ns));
    let tokens = prompt();
    let tenant_a = namespaces.resolve(Some("tenant-a"));
    let tenant_b = namespaces.resolve(Some("tenant-b"));
    assert_ne!(tenant_a, 0);
    assert_ne!(tenant_a, tenant_b);
    assert_eq!(
        namespaces.resolve(Some("tenant-a")),
        tenant_a,
        "stable per name"
    );

    let a = indexed(stored(tenant_a, &tokens), &keys);
    assert_eq!(a.len(), 3);
    assert_eq!(a, requested(&tokens, Some("tenant-a")));
    // The same tokens under another tenant, or none, are different blocks to the router.
    assert_ne!(a, requested(&tokens, Some("tenant-b")));
    assert_ne!(a, requested(&tokens, None));
    let b = indexed(stored(tenant_b, &tokens), &keys);
    assert_eq!(b, requested(&tokens, Some("tenant-b")));
}

#[test]
fn the_default_namespace_hashes_unsalted() {
    let namespaces = Arc::new(CacheNamespaces::default());
    assert_eq!(namespaces.resolve(None), 0);
    assert_eq!(
        namespaces.resolve(Some("")),
        0,
        "an empty salt is no salt, as in Dynamo"
    );
    let n = namespaces.clone();
    let keys = NamespaceKeys::new(move |ns| n.event_key(ns));
    let tokens = prompt();
    assert_eq!(indexed(stored(0, &tokens), &keys), requested(&tokens, None));
}

/// Without the names (Arbor's own `arbor-ns:<hex>` keys), the router would index a tenant's
/// blocks as unsalted: it would never find them for that tenant's requests, and would send
/// other requests to a worker that cannot reuse them. This is what the mapping fixes.
#[test]
fn hashed_keys_alone_do_not_match() {
    let namespaces = CacheNamespaces::default();
    let tenant = namespaces.resolve(Some("tenant-a"));
    let tokens = prompt();
    let blocks = indexed(stored(tenant, &tokens), &NamespaceKeys::default());
    assert_ne!(blocks, requested(&tokens, Some("tenant-a")));
    assert_eq!(blocks, requested(&tokens, None));
}

#[test]
fn namespaces_past_the_cap_stay_isolated_but_unnamed() {
    let namespaces = CacheNamespaces::default();
    for i in 0..arbor_dynamo::MAX_NAMED_NAMESPACES {
        namespaces.resolve(Some(&format!("t{i}")));
    }
    let late = namespaces.resolve(Some("one-too-many"));
    assert_ne!(late, 0);
    assert_ne!(late, namespaces.resolve(Some("t0")));
    assert!(namespaces.event_key(late).starts_with("arbor-ns:"));
    assert_eq!(
        namespaces.event_key(namespaces.resolve(Some("t0"))),
        "dynamo-cache-salt:t0"
    );
}
