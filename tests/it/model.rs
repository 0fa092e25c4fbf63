//! The model test: the same random sequences of operations against the memory and the sled
//! backend, each under the same namespace policy (`namespace::ActionResults`), and every answer
//! must agree: puts (good and wrong data), uploads (whole and resumed), ranged reads,
//! find-missing, action-cache puts and gets, invalidation of actions and namespaces, restarts
//! (sled only; the memory store just reloads its namespace records) and eviction after the
//! clock moves. Reads are also checked against the bytes that were stored.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use hoard::config::{Config, HumanDuration};
use hoard::digest::Digest;
use hoard::namespace::{ActionResults, Policy, Provenance};
use hoard::store::memory::MemoryStore;
use hoard::store::sled::{Options, SledStore};
use hoard::store::{ActionStore, Cas, Housekeeping};
use proptest::prelude::*;

/// Blob sizes: the empty blob, inline blobs and file blobs (the sled store below keeps blobs
/// above 4 KiB as files), one spanning several 1 MiB checksum chunks.
const SIZES: &[usize] = &[0, 1, 100, 4096, 4097, 70_000, 300_000, 2_500_000];
const NAMESPACES: &[&str] = &["", "ci/main", "ci/branches/x"];
const ACTIONS: usize = 4;
const RESULTS: usize = 3;
/// Below the clock steps' multiples of 600 s by a margin, so that which blobs are old enough to
/// evict never depends on the seconds the test itself takes.
const RETENTION: Duration = Duration::from_secs(3300);

#[derive(Clone, Debug)]
enum Op {
    Put(usize),
    /// Bytes that do not match the digest claimed.
    PutWrong(usize),
    /// A ByteStream-like upload in two appends.
    Upload(usize, u8),
    /// An upload that breaks off after its first part and is resumed (file blobs only).
    Resume(usize, u8),
    /// Offset as a share of the size (out of 255), optional length.
    Read(usize, u8, Option<u32>),
    FindMissing(Vec<usize>),
    AcPut(usize, usize, usize),
    AcGet(usize, usize),
    InvalidateNamespace(usize),
    InvalidateActions(usize, Vec<usize>),
    Restart,
    /// Moves both clocks by this many 10-minute steps.
    Wait(u8),
    /// Evicts everything not used within the retention period.
    Gc,
}

fn op() -> impl Strategy<Value = Op> {
    let blob = 0..SIZES.len();
    let ns = 0..NAMESPACES.len();
    prop_oneof![
        3 => blob.clone().prop_map(Op::Put),
        1 => blob.clone().prop_map(Op::PutWrong),
        2 => (blob.clone(), any::<u8>()).prop_map(|(b, s)| Op::Upload(b, s)),
        1 => (blob.clone(), any::<u8>()).prop_map(|(b, s)| Op::Resume(b, s)),
        3 => (blob.clone(), any::<u8>(), proptest::option::of(0u32..400_000))
            .prop_map(|(b, o, l)| Op::Read(b, o, l)),
        2 => proptest::collection::vec(blob, 0..6).prop_map(Op::FindMissing),
        3 => (ns.clone(), 0..ACTIONS, 0..RESULTS).prop_map(|(n, a, r)| Op::AcPut(n, a, r)),
        3 => (ns.clone(), 0..ACTIONS).prop_map(|(n, a)| Op::AcGet(n, a)),
        1 => ns.clone().prop_map(Op::InvalidateNamespace),
        1 => (ns, proptest::collection::vec(0..ACTIONS, 0..3))
            .prop_map(|(n, a)| Op::InvalidateActions(n, a)),
        1 => Just(Op::Restart),
        1 => (1u8..13).prop_map(Op::Wait),
        1 => Just(Op::Gc),
    ]
}

fn action(i: usize) -> Digest {
    Digest::of(format!("action {i}").as_bytes())
}

fn result_bytes(i: usize) -> Bytes {
    Bytes::from(format!("result {i}").repeat(i + 1))
}

/// What an answer is, for comparing: the value, or the error's gRPC code.
type Answer<T> = Result<T, tonic::Code>;

fn code<T>(r: hoard::error::Result<T>) -> Answer<T> {
    r.map_err(|e| e.code())
}

/// One backend under the namespace policy.
struct Side {
    cas: Arc<dyn Cas>,
    housekeeping: Arc<dyn Housekeeping>,
    results: ActionResults,
}

impl Side {
    async fn new<B: Cas + ActionStore + Housekeeping>(
        backend: Arc<B>,
        policy: &Arc<Policy>,
    ) -> Self {
        let results = ActionResults::open(backend.clone(), policy.clone())
            .await
            .expect("load namespace records");
        Side {
            cas: backend.clone(),
            housekeeping: backend,
            results,
        }
    }

    async fn read(&self, d: &Digest, offset: u64, limit: Option<u64>) -> Answer<Option<Vec<u8>>> {
        let Some(mut stream) = code(self.cas.read(d, offset, limit, 64 << 10).await)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&code(chunk)?);
        }
        Ok(Some(out))
    }

    async fn upload(&self, id: &str, d: &Digest, bytes: &[u8], split: usize) -> Answer<()> {
        let mut upload = code(self.cas.begin_upload(id, d, 0).await)?;
        code(upload.append(Bytes::copy_from_slice(&bytes[..split])).await)?;
        code(upload.append(Bytes::copy_from_slice(&bytes[split..])).await)?;
        code(upload.commit().await)
    }

    /// Sends the first part, breaks off, asks for progress and resumes from there.
    async fn resume(
        &self,
        id: &str,
        d: &Digest,
        bytes: &[u8],
        split: usize,
    ) -> Answer<Option<u64>> {
        let mut upload = code(self.cas.begin_upload(id, d, 0).await)?;
        code(upload.append(Bytes::copy_from_slice(&bytes[..split])).await)?;
        upload.stop().await;
        drop(upload);
        let have = code(self.cas.upload_progress(id, d).await)?;
        let at = have.unwrap_or(0);
        let mut upload = code(self.cas.begin_upload(id, d, at).await)?;
        code(
            upload
                .append(Bytes::copy_from_slice(&bytes[at as usize..]))
                .await,
        )?;
        code(upload.commit().await)?;
        Ok(have)
    }
}

/// The sled store and the policy over it, closed and opened again by a restart.
struct Disk {
    sled: SledStore,
    side: Side,
}

struct Model {
    config: Config,
    policy: Arc<Policy>,
    /// Holds the data dir for as long as the model runs.
    _dir: tempfile::TempDir,
    memory: MemoryStore,
    mem: Side,
    /// `None` only while a restart reopens it.
    disk: Option<Disk>,
    /// How far both clocks were moved (a reopened sled store starts from the wall clock).
    moved: Duration,
    uploads: u64,
}

impl Model {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        config.storage.inline_threshold = hoard::config::ByteSize(4096);
        config.storage.sled_cache_capacity = hoard::config::ByteSize(8 << 20);
        config.storage.max_size = hoard::config::ByteSize(1 << 30);
        config.storage.min_retention = HumanDuration(RETENTION);
        config.namespaces =
            Config::parse("[[namespaces.rule]]\npattern = \"ci/branches/*\"\nac_ttl = \"185m\"\n")
                .expect("namespaces")
                .namespaces;
        let policy = Arc::new(Policy::new(&config.namespaces));
        let memory = MemoryStore::from_config(&config).expect("memory store");
        let mem = Side::new(Arc::new(memory.clone()), &policy).await;
        let disk = Self::open_disk(&config, &policy, Duration::ZERO).await;
        Model {
            config,
            policy,
            _dir: dir,
            memory,
            mem,
            disk: Some(disk),
            moved: Duration::ZERO,
            uploads: 0,
        }
    }

    async fn open_disk(config: &Config, policy: &Arc<Policy>, moved: Duration) -> Disk {
        // A background thread of the closed store (a blocking read that was dropped
        // mid-stream, the group-commit thread) may hold the database a moment after the last
        // handle goes; a real restart is a new process, where exit releases it.
        let mut tries = 0;
        let sled = loop {
            match SledStore::open_with(&config.data_dir, Options::from_config(config)) {
                Ok(sled) => break sled,
                Err(e) if tries < 100 && e.to_string().contains("in use") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("open sled: {e}"),
            }
        };
        sled.advance_clock(moved);
        let side = Side::new(Arc::new(sled.clone()), policy).await;
        Disk { sled, side }
    }

    fn disk(&self) -> &Side {
        &self.disk.as_ref().expect("the sled store is open").side
    }

    /// Closes the sled store (a clean shutdown) and opens it again; the memory side reloads
    /// its namespace records.
    async fn restart(&mut self) {
        let old = self.disk.take().expect("the sled store is open");
        old.side
            .results
            .persist()
            .await
            .expect("persist namespaces");
        old.side.housekeeping.flush().await.expect("flush");
        // Every handle goes, so the database is closed before it is opened again.
        drop(old);
        self.disk = Some(Self::open_disk(&self.config, &self.policy, self.moved).await);
        self.mem
            .results
            .persist()
            .await
            .expect("persist namespaces");
        self.mem = Side::new(Arc::new(self.memory.clone()), &self.policy).await;
    }

    async fn step(&mut self, op: &Op) {
        match op {
            Op::Put(b) => {
                let (bytes, d) = blob(*b);
                let m = code(self.mem.cas.put(&d, bytes.clone().into()).await);
                let s = code(self.disk().cas.put(&d, bytes.into()).await);
                assert_eq!(m, s, "{op:?}");
            }
            Op::PutWrong(b) => {
                let (mut bytes, d) = blob(*b);
                bytes.push(0);
                let m = code(self.mem.cas.put(&d, bytes.clone().into()).await);
                let s = code(self.disk().cas.put(&d, bytes.into()).await);
                assert_eq!(m, s, "{op:?}");
                assert_eq!(m, Err(tonic::Code::InvalidArgument), "{op:?}");
            }
            Op::Upload(b, share) => {
                let (bytes, d) = blob(*b);
                let split = bytes.len() * *share as usize / 255;
                let id = self.upload_id();
                let m = self.mem.upload(&id, &d, &bytes, split).await;
                let s = self.disk().upload(&id, &d, &bytes, split).await;
                assert_eq!(m, s, "{op:?}");
            }
            Op::Resume(b, share) => {
                let (bytes, d) = blob(*b);
                if d.size <= self.config.storage.inline_threshold.0 {
                    return; // small uploads are not resumable on sled: nothing to compare
                }
                let split = bytes.len() * *share as usize / 255;
                let id = self.upload_id();
                let m = self.mem.resume(&id, &d, &bytes, split).await;
                let s = self.disk().resume(&id, &d, &bytes, split).await;
                assert_eq!(m, s, "{op:?}");
            }
            Op::Read(b, share, limit) => {
                let (bytes, d) = blob(*b);
                let offset = d.size * *share as u64 / 255;
                let limit = limit.map(u64::from);
                let m = self.mem.read(&d, offset, limit).await;
                let s = self.disk().read(&d, offset, limit).await;
                assert_eq!(m, s, "{op:?}");
                if let Ok(Some(read)) = m {
                    let end = limit.map_or(bytes.len(), |l| bytes.len().min((offset + l) as usize));
                    assert!(read == bytes[offset as usize..end], "{op:?}: wrong bytes");
                }
            }
            Op::FindMissing(blobs) => {
                let digests: Vec<Digest> = blobs.iter().map(|b| blob(*b).1).collect();
                let m = code(self.mem.cas.find_missing(&digests).await);
                let s = code(self.disk().cas.find_missing(&digests).await);
                assert_eq!(m, s, "{op:?}");
            }
            Op::AcPut(n, a, r) => {
                let (ns, action) = (NAMESPACES[*n], action(*a));
                let writer = format!("writer {}", r % 3);
                let (mem, disk) = (&self.mem.results, &self.disk().results);
                let m = code(mem.put(ns, &action, result_bytes(*r), &writer, ns).await);
                let s = code(disk.put(ns, &action, result_bytes(*r), &writer, ns).await);
                assert_eq!(m, s, "{op:?}");
            }
            Op::AcGet(n, a) => {
                let (ns, action) = (NAMESPACES[*n], action(*a));
                // Provenance first (it only looks); the two stores' clocks may read a second
                // apart, so the time is left out.
                let who = |p: Option<Provenance>| {
                    p.map(|p| (p.namespace, p.epoch, p.writer, p.instance_name))
                };
                let m = code(self.mem.results.provenance(ns, &action).await).map(who);
                let s = code(self.disk().results.provenance(ns, &action).await).map(who);
                assert_eq!(m, s, "{op:?}: provenance");
                let m = code(self.mem.results.get(ns, &action).await);
                let s = code(self.disk().results.get(ns, &action).await);
                assert_eq!(m, s, "{op:?}");
            }
            Op::InvalidateNamespace(n) => {
                let ns = NAMESPACES[*n];
                let m = code(self.mem.results.bump_epoch(ns, "model").await);
                let s = code(self.disk().results.bump_epoch(ns, "model").await);
                assert_eq!(m, s, "{op:?}");
            }
            Op::InvalidateActions(n, actions) => {
                let ns = NAMESPACES[*n];
                let actions: Vec<Digest> = actions.iter().map(|a| action(*a)).collect();
                let m = code(self.mem.results.remove(ns, &actions).await);
                let s = code(self.disk().results.remove(ns, &actions).await);
                assert_eq!(m, s, "{op:?}");
            }
            Op::Restart => self.restart().await,
            Op::Wait(steps) => {
                let by = Duration::from_secs(600 * *steps as u64);
                self.memory.advance_clock(by);
                if let Some(disk) = &self.disk {
                    disk.sled.advance_clock(by);
                }
                self.moved += by;
            }
            Op::Gc => {
                let m = code(self.mem.housekeeping.gc(Some(0)).await).map(|r| r.evicted_blobs);
                let s = code(self.disk().housekeeping.gc(Some(0)).await).map(|r| r.evicted_blobs);
                assert_eq!(m, s, "{op:?}: blobs evicted");
            }
        }
        // Namespaces known, and their epochs, agree after every step.
        let names = |r: &ActionResults| -> Vec<(String, u64)> {
            r.namespaces()
                .into_iter()
                .map(|n| (n.name, n.epoch))
                .collect()
        };
        assert_eq!(
            names(&self.mem.results),
            names(&self.disk().results),
            "after {op:?}"
        );
    }

    fn upload_id(&mut self) -> String {
        self.uploads += 1;
        format!("00000000-0000-4000-8000-{:012}", self.uploads)
    }

    async fn finish(self) {
        // Every blob's presence agrees at the end too.
        let all: Vec<Digest> = (0..SIZES.len()).map(|b| blob(b).1).collect();
        let m = code(self.mem.cas.find_missing(&all).await);
        let s = code(self.disk().cas.find_missing(&all).await);
        assert_eq!(m, s, "at the end");
        self.disk().housekeeping.flush().await.expect("flush");
    }
}

fn blob(b: usize) -> (Vec<u8>, Digest) {
    let bytes = crate::common::blob(SIZES[b], b as u64 + 1);
    let d = Digest::of(&bytes);
    (bytes, d)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Each failure shrinks over fresh stores; keep that bounded.
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn memory_and_sled_backends_give_the_same_answers(ops in proptest::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut model = Model::new().await;
            for op in &ops {
                model.step(op).await;
            }
            model.finish().await;
        });
    }
}

/// Found by the model: uploading an inline blob that is stored already did not count as a use
/// on sled, so it could be evicted within `min_retention` of a write that a client was told
/// succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_blob_uploaded_again_counts_as_used() {
    let mut model = Model::new().await;
    for op in [Op::Put(3), Op::Wait(6), Op::Upload(3, 0), Op::Gc] {
        model.step(&op).await;
    }
    model.finish().await;
}
