//! `mix`: what a Bazel build with a remote cache does, one action per step.
//!
//! A cache hit (probability `hit_ratio`) is GetActionResult of an action stored in set-up, then a
//! ByteStream Read of each of its outputs. A miss is GetActionResult of a new action (NOT_FOUND
//! expected), FindMissingBlobs of its new blobs among already stored inputs (the answer must be
//! exactly the new ones), BatchUpdateBlobs of the action, command and small outputs, a ByteStream
//! Write of the large output, and UpdateActionResult.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

use super::ac::{action_result, get, update};
use super::{
    batch_update, find_missing_verified, key, read_name, read_verified, write_chunks, write_name,
    Env, Worker, Workload,
};
use crate::data::{mix, Family, Rng};
use hoard::proto::reapi::{ActionResult, Digest};

/// Size of the Action and Command blobs.
const META_SIZE: u64 = 300;

/// ByteStream chunk size for large outputs (Bazel's default is 16 KiB; servers and clients
/// commonly use up to 1 MiB).
const CHUNK: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct MixParams {
    pub hit_ratio: f64,
    /// Actions stored in set-up, the ones cache hits pick from.
    pub pool: u64,
    /// Small outputs per action, sent with BatchUpdateBlobs.
    pub outputs: usize,
    pub output_size: u64,
    /// Size of one more output per action, sent with ByteStream; 0 for none.
    pub large_output_size: u64,
    /// Digests per FindMissingBlobs call (new blobs plus already stored inputs).
    pub find_missing: usize,
}

pub struct Mix {
    params: MixParams,
    seed: u64,
    /// Action and Command blobs: members 2a and 2a+1 for action a.
    meta: Family,
    /// Small outputs: members a*outputs .. (a+1)*outputs.
    small: Family,
    /// Large output: member a.
    large: Option<Arc<Family>>,
    /// Stored blobs that fill FindMissingBlobs calls.
    inputs: Vec<Digest>,
}

/// Everything about action number `a`.
struct Action {
    index: u64,
    digest: Digest,
    /// Action, Command and small outputs.
    blobs: Vec<(Digest, Bytes)>,
    large: Option<Digest>,
    result: ActionResult,
}

impl Mix {
    pub async fn setup(env: &Env, w: &mut Worker, params: MixParams) -> Result<Self, String> {
        let batch = 2 * META_SIZE + params.outputs as u64 * params.output_size;
        if env.max_batch != 0 && batch > env.max_batch {
            return Err(format!(
                "an action's batch ({batch} bytes) exceeds the server's \
                 max_batch_total_size_bytes ({}); lower --outputs or --output-size",
                env.max_batch
            ));
        }
        super::cas::check_size(params.output_size)?;
        if params.large_output_size > 0 {
            super::cas::check_size(params.large_output_size)?;
        }
        if params.pool == 0 && params.hit_ratio > 0.0 {
            return Err("--pool must be above 0 when --hit-ratio is".into());
        }
        let large = if params.large_output_size > 0 {
            let (seed, size) = (mix(env.seed ^ 0x1A26E), params.large_output_size);
            let f = tokio::task::spawn_blocking(move || Family::new(seed, size))
                .await
                .map_err(|e| format!("hashing the test data failed: {e}"))?;
            Some(Arc::new(f))
        } else {
            None
        };
        let inputs_family = Family::new(mix(env.seed ^ 0x14E075), params.output_size);
        let input_blobs: Vec<_> = (0..4 * params.find_missing as u64)
            .map(|m| (inputs_family.digest(m), inputs_family.bytes(m)))
            .collect();
        let inputs = input_blobs.iter().map(|(d, _)| d.clone()).collect();
        let mix = Mix {
            meta: Family::new(env.seed, META_SIZE),
            small: Family::new(mix(env.seed ^ 0x5AA11), params.output_size),
            seed: env.seed,
            large,
            inputs,
            params,
        };
        w.upload_all(env, input_blobs).await;
        w.check("uploading the inputs")?;
        for a in 0..mix.params.pool {
            mix.store(w, &mix.action(a)).await;
            w.check("storing the actions cache hits read")?;
        }
        Ok(mix)
    }

    fn action(&self, a: u64) -> Action {
        let meta = |m: u64| (self.meta.digest(m), self.meta.bytes(m));
        let mut blobs = vec![meta(2 * a), meta(2 * a + 1)];
        let first = a * self.params.outputs as u64;
        blobs.extend(
            (first..first + self.params.outputs as u64)
                .map(|m| (self.small.digest(m), self.small.bytes(m))),
        );
        let large = self.large.as_ref().map(|f| f.digest(a));
        let outputs: Vec<Digest> = blobs[2..]
            .iter()
            .map(|(d, _)| d.clone())
            .chain(large.clone())
            .collect();
        Action {
            index: a,
            digest: blobs[0].0.clone(),
            result: action_result(a, &outputs),
            blobs,
            large,
        }
    }

    /// Uploads an action's blobs and its result.
    async fn store(&self, w: &mut Worker, action: &Action) -> Option<()> {
        let fut = batch_update(w.conn.cas.clone(), w.instance.clone(), action.blobs.clone());
        w.op("BatchUpdateBlobs", fut).await?;
        if let (Some(family), Some(digest)) = (&self.large, &action.large) {
            let (f, a) = (family.clone(), action.index);
            let name = write_name(&w.instance, digest);
            let fut = write_chunks(w.conn.bs.clone(), name, f.size(), CHUNK, move |offset| {
                f.chunk(a, offset, CHUNK)
            });
            w.op("Write", fut).await?;
        }
        update(w, &action.digest, &action.result).await
    }

    async fn miss(&self, w: &mut Worker, a: u64, rng: &mut Rng) {
        let action = self.action(a);
        get(w, "GetActionResult(miss)", &action.digest, None).await;
        let new: Vec<Digest> = action
            .blobs
            .iter()
            .map(|(d, _)| d.clone())
            .chain(action.large.clone())
            .collect();
        let absent: HashSet<(String, i64)> = new.iter().map(key).collect();
        let mut digests = new;
        while digests.len() < self.params.find_missing && !self.inputs.is_empty() {
            let pick = rng.below(self.inputs.len() as u64) as usize;
            digests.push(self.inputs[pick].clone());
        }
        let fut = find_missing_verified(w.conn.cas.clone(), w.instance.clone(), digests, &absent);
        w.op("FindMissingBlobs", fut).await;
        self.store(w, &action).await;
    }

    async fn hit(&self, w: &mut Worker, a: u64) {
        let action = self.action(a);
        let kind = "GetActionResult(hit)";
        if get(w, kind, &action.digest, Some(&action.result))
            .await
            .is_none()
        {
            return;
        }
        for d in action.blobs[2..]
            .iter()
            .map(|(d, _)| d)
            .chain(action.large.as_ref())
        {
            let name = read_name(&w.instance, d);
            let fut = read_verified(w.conn.bs.clone(), name, d);
            w.op("Read", fut).await;
        }
    }
}

impl Workload for Mix {
    async fn step(&self, w: &mut Worker, i: u64) {
        let mut rng = Rng::new(self.seed ^ mix(i));
        if rng.next_f64() < self.params.hit_ratio {
            let a = rng.below(self.params.pool);
            self.hit(w, a).await;
        } else {
            // New actions are numbered after the pool.
            self.miss(w, self.params.pool + i, &mut rng).await;
        }
    }
}
