use hoard::proto::reapi::{
    self, ActionResult, Directory, ExecutedActionMetadata, FileNode, GetActionResultRequest,
    OutputDirectory, OutputFile, OutputSymlink, Tree, UpdateActionResultRequest,
};
use prost::Message;

use crate::common::{batch_put, blob, digest_of, update_result, TestServer};

fn get(instance: &str, action: &reapi::Digest) -> GetActionResultRequest {
    GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        ..Default::default()
    }
}

async fn update(server: &TestServer, instance: &str, action: &reapi::Digest, r: &ActionResult) {
    update_result(server, instance, action, r)
        .await
        .expect("update action result");
}

/// A result that sets every kind of field, so any field we failed to keep shows up as a diff.
fn rich_result(out: &[u8], stdout: &[u8], tree: &[u8]) -> ActionResult {
    let ts = |s| prost_types::Timestamp {
        seconds: s,
        nanos: 7,
    };
    #[allow(deprecated)]
    ActionResult {
        output_files: vec![OutputFile {
            path: "bin/out".into(),
            digest: Some(digest_of(out)),
            is_executable: true,
            contents: Default::default(),
            node_properties: Some(reapi::NodeProperties {
                properties: vec![reapi::NodeProperty {
                    name: "k".into(),
                    value: "v".into(),
                }],
                mtime: Some(ts(5)),
                unix_mode: Some(0o755),
            }),
        }],
        output_file_symlinks: vec![OutputSymlink {
            path: "old/link".into(),
            target: "x".into(),
            node_properties: None,
        }],
        output_symlinks: vec![OutputSymlink {
            path: "link".into(),
            target: "bin/out".into(),
            node_properties: None,
        }],
        output_directories: vec![OutputDirectory {
            path: "gen".into(),
            tree_digest: Some(digest_of(tree)),
            is_topologically_sorted: true,
            root_directory_digest: None,
        }],
        output_directory_symlinks: vec![],
        exit_code: 3,
        stdout_raw: Default::default(),
        stdout_digest: Some(digest_of(stdout)),
        stderr_raw: Default::default(),
        stderr_digest: None,
        execution_metadata: Some(ExecutedActionMetadata {
            worker: "w1".into(),
            queued_timestamp: Some(ts(1)),
            worker_start_timestamp: Some(ts(2)),
            worker_completed_timestamp: Some(ts(3)),
            input_fetch_start_timestamp: Some(ts(4)),
            input_fetch_completed_timestamp: Some(ts(5)),
            execution_start_timestamp: Some(ts(6)),
            execution_completed_timestamp: Some(ts(7)),
            virtual_execution_duration: Some(prost_types::Duration {
                seconds: 1,
                nanos: 2,
            }),
            output_upload_start_timestamp: Some(ts(8)),
            output_upload_completed_timestamp: Some(ts(9)),
            auxiliary_metadata: vec![prost_types::Any {
                type_url: "type.example/x".into(),
                value: vec![1, 2, 3],
            }],
        }),
    }
}

/// Stores an output file, stdout and a tree with one file, returning a result that uses them.
async fn stored_result(server: &TestServer) -> (ActionResult, Vec<u8>, Vec<u8>, Vec<u8>) {
    let out = blob(5000, 1);
    let stdout = b"compiling...\n".to_vec();
    let tree_file = blob(100, 2);
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "g.txt".into(),
                digest: Some(digest_of(&tree_file)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    batch_put(server, "", &[&out, &stdout, &tree_file, &tree]).await;
    (rich_result(&out, &stdout, &tree), out, stdout, tree_file)
}

#[tokio::test]
async fn update_then_get_returns_every_field_and_instances_are_separate() {
    let server = TestServer::start().await;
    let (result, ..) = stored_result(&server).await;
    let action = digest_of(b"action 1");

    let err = server
        .ac()
        .get_action_result(get("ci/main", &action))
        .await
        .expect_err("not stored yet");
    assert_eq!(err.code(), tonic::Code::NotFound);

    update(&server, "ci/main", &action, &result).await;
    let got = server
        .ac()
        .get_action_result(get("ci/main", &action))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got, result);

    let err = server
        .ac()
        .get_action_result(get("ci/other", &action))
        .await
        .expect_err("another instance has its own action cache");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn results_with_missing_outputs_are_not_served() {
    let server = TestServer::start().await;
    let (complete, ..) = stored_result(&server).await;

    // An output file that was never uploaded.
    let mut missing_file = complete.clone();
    missing_file.output_files[0].digest = Some(digest_of(b"gone"));
    // A tree whose file was never uploaded.
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "lost".into(),
                digest: Some(digest_of(b"lost file")),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    batch_put(&server, "", &[&tree]).await;
    let mut missing_in_tree = complete.clone();
    missing_in_tree.output_directories[0].tree_digest = Some(digest_of(&tree));

    // A tree digest naming a blob that is not a Tree.
    let not_a_tree = b"\xff\xff\xff not a protobuf".to_vec();
    batch_put(&server, "", &[&not_a_tree]).await;
    let mut garbage_tree = complete.clone();
    garbage_tree.output_directories[0].tree_digest = Some(digest_of(&not_a_tree));

    for (i, r) in [missing_file, missing_in_tree, garbage_tree]
        .iter()
        .enumerate()
    {
        let action = digest_of(format!("action {i}").as_bytes());
        update(&server, "", &action, r).await;
        let err = server
            .ac()
            .get_action_result(get("", &action))
            .await
            .expect_err("incomplete result");
        assert_eq!(err.code(), tonic::Code::NotFound, "case {i}");
        assert!(
            err.message().contains("no longer in the CAS") || err.message().contains("not a Tree"),
            "{}",
            err.message()
        );
    }
}

#[tokio::test]
async fn small_outputs_are_inlined_on_request() {
    let server = TestServer::start().await;
    let (result, out, stdout, _) = stored_result(&server).await;
    let action = digest_of(b"inline me");
    update(&server, "", &action, &result).await;

    let plain = server
        .ac()
        .get_action_result(get("", &action))
        .await
        .unwrap()
        .into_inner();
    assert!(plain.stdout_raw.is_empty());
    assert!(plain.output_files[0].contents.is_empty());

    let inlined = server
        .ac()
        .get_action_result(GetActionResultRequest {
            inline_stdout: true,
            inline_stderr: true,
            inline_output_files: vec!["bin/out".into()],
            ..get("", &action)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inlined.stdout_raw.as_ref(), stdout.as_slice());
    assert_eq!(inlined.output_files[0].contents.as_ref(), out.as_slice());
    assert!(
        inlined.stderr_raw.is_empty(),
        "no stderr digest, nothing to inline"
    );
}

#[tokio::test]
async fn bad_requests_get_invalid_argument() {
    let server = TestServer::start().await;
    let err = server
        .ac()
        .get_action_result(GetActionResultRequest {
            action_digest: Some(reapi::Digest {
                hash: "xyz".into(),
                size_bytes: 3,
            }),
            ..Default::default()
        })
        .await
        .expect_err("malformed digest");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("action_digest"));

    let err = server
        .ac()
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(digest_of(b"a")),
            action_result: None,
            ..Default::default()
        })
        .await
        .expect_err("no result");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let mut bad_output = ActionResult::default();
    bad_output.output_files.push(OutputFile {
        path: "x".into(),
        digest: Some(reapi::Digest {
            hash: "short".into(),
            size_bytes: 1,
        }),
        ..Default::default()
    });
    let err = server
        .ac()
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(digest_of(b"a")),
            action_result: Some(bad_output),
            ..Default::default()
        })
        .await
        .expect_err("malformed output digest");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("\"x\""), "{}", err.message());

    let err = server
        .ac()
        .get_action_result(GetActionResultRequest {
            digest_function: reapi::digest_function::Value::Sha1 as i32,
            ..get("", &digest_of(b"a"))
        })
        .await
        .expect_err("unsupported digest function");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}
