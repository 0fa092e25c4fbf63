//! `ac`: UpdateActionResult then GetActionResult of the same new action, comparing what comes
//! back with what was written; with `--hits N`, GetActionResult alone of N results stored in
//! set-up.

use super::{status, Env, Worker, Workload};
use crate::data::{mix, Family, Rng};
use hoard::proto::reapi::{
    ActionResult, Digest, ExecutedActionMetadata, GetActionResultRequest, OutputFile,
    UpdateActionResultRequest,
};

/// Size of the (never uploaded) blobs whose digests serve as action keys.
const ACTION_SIZE: u64 = 140;

pub struct ActionCache {
    actions: Family,
    /// Output files every result lists; stored in set-up so the server can serve the results.
    outputs: Vec<Digest>,
    /// `--hits N`: results `0..N` are stored in set-up and each step reads one of them.
    hits: Option<u64>,
    seed: u64,
}

impl ActionCache {
    pub async fn setup(
        env: &Env,
        w: &mut Worker,
        outputs: usize,
        output_size: u64,
        hits: Option<u64>,
    ) -> Result<Self, String> {
        super::cas::check_size(output_size)?;
        if hits == Some(0) {
            return Err("--hits must be at least 1".into());
        }
        let family = Family::new(mix(env.seed ^ 0x0A7), output_size);
        let blobs: Vec<_> = (0..outputs as u64)
            .map(|m| (family.digest(m), family.bytes(m)))
            .collect();
        let outputs: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
        w.upload_all(env, blobs).await;
        w.check("uploading the output files")?;
        let actions = Family::new(env.seed, ACTION_SIZE);
        if let Some(n) = hits {
            for i in 0..n {
                let result = action_result(i, &outputs);
                update(w, &actions.digest(i), &result).await;
            }
            w.check("storing the results to read")?;
        }
        Ok(ActionCache {
            actions,
            outputs,
            hits,
            seed: env.seed,
        })
    }
}

/// A plausible result listing `outputs`, distinct per `i`.
pub fn action_result(i: u64, outputs: &[Digest]) -> ActionResult {
    ActionResult {
        output_files: outputs
            .iter()
            .enumerate()
            .map(|(n, d)| OutputFile {
                path: format!("bazel-out/k8-fastbuild/bin/pkg/target_{i}/out_{n}.o"),
                digest: Some(d.clone()),
                is_executable: n == 0,
                ..Default::default()
            })
            .collect(),
        exit_code: 0,
        execution_metadata: Some(ExecutedActionMetadata {
            worker: format!("hoard-bench/{i}"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// UpdateActionResult; its answer is not checked (servers differ in what they echo).
pub async fn update(w: &mut Worker, action: &Digest, result: &ActionResult) -> Option<()> {
    let mut ac = w.conn.ac.clone();
    let request = UpdateActionResultRequest {
        instance_name: w.instance.clone(),
        action_digest: Some(action.clone()),
        action_result: Some(result.clone()),
        results_cache_policy: None,
        digest_function: 0,
    };
    let fut = async move {
        ac.update_action_result(request).await.map_err(status)?;
        Ok(((), 0))
    };
    w.op("UpdateActionResult", fut).await
}

/// GetActionResult; `Ok(None)` is NOT_FOUND.
pub async fn get(
    w: &mut Worker,
    kind: &'static str,
    action: &Digest,
    expect: Option<&ActionResult>,
) -> Option<()> {
    let mut ac = w.conn.ac.clone();
    let request = GetActionResultRequest {
        instance_name: w.instance.clone(),
        action_digest: Some(action.clone()),
        inline_stdout: false,
        inline_stderr: false,
        inline_output_files: Vec::new(),
        digest_function: 0,
    };
    let fut = async move {
        let got = match ac.get_action_result(request).await {
            Ok(r) => Some(r.into_inner()),
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => return Err(status(s)),
        };
        match (got, expect) {
            (None, None) => Ok(((), 0)),
            (Some(_), None) => Err(format!(
                "{}: a result for an action never stored (reused --seed?)",
                action.hash
            )),
            (None, Some(_)) => Err(format!("{}: NOT_FOUND after an update", action.hash)),
            (Some(got), Some(want)) if got != *want => Err(format!(
                "{}: the result read back differs from the one written",
                action.hash
            )),
            (Some(_), Some(_)) => Ok(((), 0)),
        }
    };
    w.op(kind, fut).await
}

impl Workload for ActionCache {
    async fn step(&self, w: &mut Worker, i: u64) {
        if let Some(n) = self.hits {
            let k = Rng::new(self.seed ^ mix(i + 1)).below(n);
            let result = action_result(k, &self.outputs);
            get(w, "GetActionResult", &self.actions.digest(k), Some(&result)).await;
            return;
        }
        let action = self.actions.digest(i);
        let result = action_result(i, &self.outputs);
        if update(w, &action, &result).await.is_some() {
            get(w, "GetActionResult", &action, Some(&result)).await;
        }
    }
}
