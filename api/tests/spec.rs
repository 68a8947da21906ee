//! `api-spec/cloud-hypervisor.yaml` against the code: every endpoint the server routes is in the
//! spec with its method and nothing else is, and the fault-tolerance schemas name exactly the
//! fields (and enum values) serde reads and writes. The schema-driven test of a running VMM
//! (`ci/api-schema-test`) needs KVM and Python; this one catches drift in `cargo test`.
//!
//! The spec is read as text with a few indentation rules that hold for this file (2-space
//! steps, one key per line, enum lists in flow style), so no YAML parser is needed.

use std::collections::BTreeSet;

use api::ENDPOINTS;
use vmm::control::{EnableFtRequest, FtDiskMode, FtHealth, FtRole, FtStatus, ReceiveFtRequest};

fn spec() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../api-spec/cloud-hypervisor.yaml"
    );
    std::fs::read_to_string(path).expect("read api-spec/cloud-hypervisor.yaml")
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The lines under the key `key` that sits at `at` spaces (the first such key in `lines`),
/// up to the next line indented `at` or less.
fn block<'a>(lines: &[&'a str], at: usize, key: &str) -> Vec<&'a str> {
    let start = lines
        .iter()
        .position(|l| indent(l) == at && l.trim_start().starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no key {key:?} at indent {at}"));
    lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > at)
        .copied()
        .collect()
}

/// The keys directly under a block whose entries sit at `at` spaces.
fn keys(lines: &[&str], at: usize) -> BTreeSet<String> {
    lines
        .iter()
        .filter(|l| indent(l) == at && !l.trim().is_empty())
        .map(|l| {
            l.trim()
                .split(':')
                .next()
                .unwrap()
                .trim_matches('"')
                .to_string()
        })
        .collect()
}

/// A flow-style list (`key: [a, "b",\n c]`) starting in `lines` at the key `key`.
fn flow_list(lines: &[&str], key: &str) -> Vec<String> {
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with(&format!("{key}: [")))
        .unwrap_or_else(|| panic!("no {key}: [...]"));
    let mut text = String::new();
    for line in &lines[start..] {
        text.push_str(line.trim());
        text.push(' ');
        if line.contains(']') {
            break;
        }
    }
    let inner = text.split_once('[').unwrap().1.split_once(']').unwrap().0;
    inner
        .split(',')
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// A schema of `components.schemas`.
fn schema<'a>(lines: &[&'a str], name: &str) -> Vec<&'a str> {
    let schemas = block(&block(lines, 0, "components"), 2, "schemas");
    block(&schemas, 4, name)
}

fn json_keys(value: serde_json::Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn every_routed_endpoint_is_in_the_spec_and_nothing_else() {
    let text = spec();
    let lines: Vec<&str> = text.lines().collect();
    let paths = block(&lines, 0, "paths");
    let in_spec: BTreeSet<(String, String)> = keys(&paths, 2)
        .into_iter()
        .map(|path| {
            let methods = keys(&block(&paths, 2, &path), 4);
            assert_eq!(methods.len(), 1, "{path}: {methods:?}");
            let method = methods.into_iter().next().unwrap().to_uppercase();
            (path.trim_start_matches('/').to_string(), method)
        })
        .collect();
    let routed: BTreeSet<(String, String)> = ENDPOINTS
        .iter()
        .map(|(name, method, _)| (name.to_string(), method.to_string()))
        .collect();
    assert_eq!(in_spec, routed);
}

#[test]
fn ft_schemas_match_serde() {
    let text = spec();
    let lines: Vec<&str> = text.lines().collect();

    let enable = EnableFtRequest {
        peer: "b:1".into(),
        epoch_ms: 10,
        disk_mode: FtDiskMode::Replicated,
        heartbeat_timeout_ms: None,
        witness: None,
        fencing: Some("etcd://e:2379".into()),
        compress: true,
        hot_pages: false,
        stage_helper: false,
        early_staging: false,
        early_send: false,
        early_acks: false,
        resend_output: false,
        latency_mode: true,
        encode_threads: Some(2),
        streams: Some(3),
        group: Some("/run/web.sock".into()),
        // Fields left out at their defaults are set so that every one is compared.
        tls_dir: Some("/etc/tandem/tls".into()),
        insecure_plaintext: true,
    };
    let receive = ReceiveFtRequest {
        receiver_url: "tcp:0.0.0.0:1".into(),
        disk_paths: vec![],
        taps: vec![],
        witness: None,
        fencing: Some("etcd://e:2379".into()),
        group: None,
        tls_dir: Some("/etc/tandem/tls".into()),
        insecure_plaintext: true,
    };
    let status = FtStatus::default();
    for (name, value) in [
        ("EnableFtData", serde_json::to_value(&enable).unwrap()),
        ("ReceiveFtData", serde_json::to_value(&receive).unwrap()),
        ("FtStatus", serde_json::to_value(&status).unwrap()),
    ] {
        let schema = schema(&lines, name);
        let properties = keys(&block(&schema, 6, "properties"), 8);
        assert_eq!(properties, json_keys(value.clone()), "{name} properties");
        // Every value that serializes as null is declared nullable.
        for (field, v) in value.as_object().unwrap() {
            let nullable = block(&block(&schema, 6, "properties"), 8, field)
                .iter()
                .any(|l| l.trim() == "nullable: true");
            if v.is_null() {
                assert!(nullable, "{name}.{field} is null but not nullable");
            }
        }
    }
    // The status always has every field; the requests need only these.
    let required: BTreeSet<String> = flow_list(&schema(&lines, "FtStatus"), "required")
        .into_iter()
        .collect();
    assert_eq!(required, json_keys(serde_json::to_value(&status).unwrap()));
    assert_eq!(
        flow_list(&schema(&lines, "EnableFtData"), "required"),
        ["peer"]
    );
    assert_eq!(
        flow_list(&schema(&lines, "ReceiveFtData"), "required"),
        ["receiver_url"]
    );
}

/// Each variant, spelled by serde. The matches stop compiling when a variant is added, so the
/// spec's enums are revisited with it.
fn all_roles() -> Vec<FtRole> {
    let all = vec![FtRole::None, FtRole::Primary, FtRole::Backup];
    for r in &all {
        match r {
            FtRole::None | FtRole::Primary | FtRole::Backup => {}
        }
    }
    all
}

fn all_healths() -> Vec<FtHealth> {
    use FtHealth::*;
    let all = vec![
        Off,
        Syncing,
        Protected,
        WaitingForPrimary,
        Degraded,
        Fenced,
        TookOver,
        Failed,
    ];
    for h in &all {
        match h {
            Off | Syncing | Protected | WaitingForPrimary | Degraded | Fenced | TookOver
            | Failed => {}
        }
    }
    all
}

fn all_disk_modes() -> Vec<FtDiskMode> {
    let all = vec![FtDiskMode::Replicated, FtDiskMode::Shared];
    for m in &all {
        match m {
            FtDiskMode::Replicated | FtDiskMode::Shared => {}
        }
    }
    all
}

/// The serde spelling of unit enum values.
macro_rules! spelled {
    ($values:expr) => {
        $values
            .iter()
            .map(|v| {
                serde_json::to_value(v)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect::<Vec<String>>()
    };
}

#[test]
fn ft_enums_match_serde() {
    let text = spec();
    let lines: Vec<&str> = text.lines().collect();
    let property = |schema_name: &str, field: &str| {
        let schema = schema(&lines, schema_name);
        let properties = block(&schema, 6, "properties");
        flow_list(&block(&properties, 8, field), "enum")
    };
    assert_eq!(property("FtStatus", "role"), spelled!(all_roles()));
    assert_eq!(property("FtStatus", "health"), spelled!(all_healths()));
    assert_eq!(
        property("FtStatus", "disk_mode"),
        spelled!(all_disk_modes())
    );
    assert_eq!(
        property("EnableFtData", "disk_mode"),
        spelled!(all_disk_modes())
    );
}

/// Whether `field` of schema `name` may be null: declared on the property, or on the schema a
/// bare `$ref` points to.
fn nullable(lines: &[&str], name: &str, field: &str) -> bool {
    let property = block(&block(&schema(lines, name), 6, "properties"), 8, field);
    if property.iter().any(|l| l.trim() == "nullable: true") {
        return true;
    }
    property
        .iter()
        .find_map(|l| l.trim().strip_prefix("$ref: \"#/components/schemas/"))
        .map(|target| {
            schema(lines, target.trim_end_matches('"'))
                .iter()
                .any(|l| indent(l) == 6 && l.trim() == "nullable: true")
        })
        .unwrap_or(false)
}

/// The schema `name` lists exactly the members serde writes for `value`, and every member
/// written as null is nullable.
fn check_schema(lines: &[&str], name: &str, value: &serde_json::Value) {
    let properties = keys(&block(&schema(lines, name), 6, "properties"), 8);
    assert_eq!(properties, json_keys(value.clone()), "{name} properties");
    for (field, v) in value.as_object().unwrap() {
        if v.is_null() {
            assert!(
                nullable(lines, name, field),
                "{name}.{field} is null but not nullable"
            );
        }
    }
}

/// serde's JSON for any value (the api crate names no serde trait of its own).
macro_rules! value {
    ($v:expr) => {
        serde_json::to_value($v).unwrap()
    };
}

#[test]
fn vm_config_schemas_match_serde() {
    use vmm::config::{
        CpuTopology, DiskConfig, FsConfig, NetConfig, PayloadConfig, PlatformConfig, PmemConfig,
        VmConfig, VsockConfig,
    };
    use vmm::control::{
        DeviceNode, DeviceResource, PciBarType, VmInfoResponse, VmResizeRequest, VmState,
    };
    let text = spec();
    let lines: Vec<&str> = text.lines().collect();

    let mut config = VmConfig {
        sgx_epc: Some(Vec::new()),
        ..VmConfig::default()
    };
    let full = value!(&config);
    check_schema(&lines, "VmConfig", &full);
    for (name, member) in [
        ("CpusConfig", "cpus"),
        ("MemoryConfig", "memory"),
        ("ConsoleConfig", "console"),
        ("ConsoleConfig", "serial"),
        ("DebugConsoleConfig", "debug_console"),
        ("RngConfig", "rng"),
    ] {
        check_schema(&lines, name, &full[member]);
    }
    config.cpus.topology = Some(CpuTopology {
        threads_per_core: 1,
        cores_per_die: 1,
        dies_per_package: 1,
        packages: 1,
    });
    check_schema(
        &lines,
        "CpuTopology",
        &value!(&config).pointer("/cpus/topology").cloned().unwrap(),
    );
    for (name, v) in [
        ("PayloadConfig", value!(&PayloadConfig::default())),
        ("DiskConfig", value!(&DiskConfig::with_path("/d"))),
        ("NetConfig", value!(&NetConfig::default())),
        ("PlatformConfig", value!(&PlatformConfig::default())),
        ("VsockConfig", value!(&VsockConfig::new(3, "/v"))),
        ("PmemConfig", value!(&PmemConfig::new("/p"))),
        ("FsConfig", value!(&FsConfig::new("t", "/f"))),
        ("VmResize", value!(&VmResizeRequest::default())),
    ] {
        check_schema(&lines, name, &v);
    }
    let node = DeviceNode {
        id: "_virtio-pci-_disk0".into(),
        resources: vec![DeviceResource::PciBar {
            index: 0,
            base: 0xc000_0000,
            size: 0x8_0000,
            type_: PciBarType::Mmio32,
            prefetchable: false,
        }],
        parent: Some("x".into()),
        children: vec!["_disk0".into()],
        pci_bdf: Some("0000:00:02.0".into()),
    };
    let node_json = value!(&node);
    check_schema(&lines, "DeviceNode", &node_json);
    assert_eq!(
        node_json["resources"][0]["PciBar"]["type_"],
        serde_json::json!("Mmio32")
    );
    let info = VmInfoResponse {
        config: VmConfig::default(),
        state: VmState::Running,
        memory_actual_size: 1 << 29,
        device_tree: Some([(node.id.clone(), node)].into_iter().collect()),
    };
    check_schema(&lines, "VmInfo", &value!(&info));
    // The enums the schemas spell out are serde's.
    let property = |schema_name: &str, field: &str| {
        let schema = schema(&lines, schema_name);
        flow_list(&block(&block(&schema, 6, "properties"), 8, field), "enum")
    };
    assert_eq!(
        property("CpusConfig", "core_scheduling"),
        ["Vm", "Vcpu", "Off"]
    );
    assert_eq!(
        property("DiskConfig", "image_type"),
        ["FlatVmdk", "FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"]
    );
    for variant in property("DiskConfig", "image_type") {
        serde_json::from_value::<vmm::config::ImageType>(serde_json::json!(variant)).unwrap();
    }
    assert_eq!(property("NetConfig", "vhost_mode"), ["Client", "Server"]);
    assert_eq!(
        property("DiskConfig", "lock_granularity"),
        ["ByteRange", "Full"]
    );
}
