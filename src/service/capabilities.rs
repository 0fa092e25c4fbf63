//! `Capabilities.GetCapabilities`: what clients learn before anything else. Bazel reads the digest
//! functions, the batch size limit and whether it may upload action results.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Limits;
use crate::auth::{Access, Caller};
use crate::instance_name;
use crate::namespace::Policy;
use crate::proto::build::bazel::semver::SemVer;
use crate::proto::reapi::{
    self, capabilities_server::Capabilities, digest_function, symlink_absolute_path_strategy,
    ActionCacheUpdateCapabilities, CacheCapabilities, GetCapabilitiesRequest, PriorityCapabilities,
    ServerCapabilities,
};

pub struct CapabilitiesService {
    limits: Limits,
    /// Says per instance whether action results may be updated.
    policy: Arc<Policy>,
    /// On a replica: its upstream, whose freshness the answer carries for a replica in front.
    upstream: Option<Arc<crate::upstream::Upstream>>,
}

impl CapabilitiesService {
    pub fn new(limits: Limits) -> Self {
        CapabilitiesService {
            limits,
            policy: Arc::new(Policy::default()),
            upstream: None,
        }
    }

    pub fn with_policy(mut self, policy: Arc<Policy>) -> Self {
        self.policy = policy;
        self
    }

    /// On a replica: answers carry `hoard-upstream-current` (see `crate::upstream`).
    pub fn with_upstream(mut self, upstream: Arc<crate::upstream::Upstream>) -> Self {
        self.upstream = Some(upstream);
        self
    }

    fn capabilities(&self, instance: &str, caller: &Caller) -> ServerCapabilities {
        let version = |minor| SemVer {
            major: 2,
            minor,
            patch: 0,
            prerelease: String::new(),
        };
        ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: vec![digest_function::Value::Sha256 as i32],
                // Honest per instance and caller: Bazel then skips uploads that would be refused
                // (a read-only namespace, or a caller without write on its target).
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: self
                        .policy
                        .write_target(instance)
                        .is_some_and(|target| caller.may(Access::Write, target)),
                }),
                cache_priority_capabilities: Some(PriorityCapabilities {
                    priorities: vec![reapi::priority_capabilities::PriorityRange {
                        min_priority: 0,
                        max_priority: 0,
                    }],
                }),
                max_batch_total_size_bytes: self.limits.max_batch_total_size as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                // ByteStream only; batch calls carry uncompressed data.
                supported_compressors: vec![reapi::compressor::Value::Zstd as i32],
                max_cas_blob_size_bytes: self.limits.max_blob_size.unwrap_or(0) as i64,
                ..Default::default()
            }),
            execution_capabilities: None,
            deprecated_api_version: None,
            low_api_version: Some(version(0)),
            high_api_version: Some(version(3)),
        }
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let caller = Caller::of(&request);
        let instance = &request.get_ref().instance_name;
        instance_name::validate(instance)?;
        let mut response = Response::new(self.capabilities(instance, &caller));
        if let Some(upstream) = &self.upstream {
            let current = if upstream.current() { "1" } else { "0" };
            response.metadata_mut().insert(
                crate::upstream::CURRENT_HEADER,
                tonic::metadata::MetadataValue::from_static(current),
            );
        }
        Ok(response)
    }
}
