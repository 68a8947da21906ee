//! FT groups (fate sharing) end to end: two VMs on host A in one group, each with its backup
//! on host B, a client in a third namespace. One client connection asks VM 1 directly; the
//! other asks VM 1 to relay each request to VM 2 (frames between the members are not held by
//! the output gates, so this checks that the members always roll back together: VM 2's
//! sequence as seen through VM 1 must go on with no gap and no repeat).
//!
//! - Killing either member's primary fails over the whole group: the other primary fences
//!   itself, both backups take over at the same group epoch, both client connections go on.
//! - Killing a member's backup degrades the whole group: both primaries run on unprotected,
//!   the other backup stands down, the clients notice nothing.
//! - The member whose VMMs host both coordinators leaving on purpose (`disable-ft`) hands the
//!   coordinators on: the other member stays protected, and its primary dying later still
//!   fails it over through the backups' new coordinator.

use std::path::PathBuf;
use std::time::Duration;

use integration::ft::{ft_status, start_witness, wait_status, witness_addr, Load, SeqClient};
use integration::{
    api_vmm, ch_remote, guest_vm_args, kvm_serial_guard, report, require_kvm, require_netns,
    test_guest, two_hosts, TempDir, TwoHosts, Vmm, HOST_B,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// One member: its primary on host A, its backup on host B.
struct Member {
    primary: Vmm,
    primary_socket: PathBuf,
    backup: Vmm,
    backup_socket: PathBuf,
    ip: String,
}

struct Group {
    hosts: TwoHosts,
    _dir: TempDir,
    members: Vec<Member>,
    _witness: Vmm,
}

fn ok(out: std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

impl Group {
    fn diagnose(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                format!(
                    "{}\n{}\nprimary ft-status: {}\nbackup ft-status: {}",
                    m.primary.diagnose("primary"),
                    m.backup.diagnose("backup"),
                    ft_status(&m.primary_socket),
                    ft_status(&m.backup_socket)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Boots two `workload=ft` guests on host A and protects them as one group.
fn start_group(tag: &str) -> Group {
    let hosts = two_hosts(tag);
    let dir = TempDir::new(&format!("ft_group_{tag}")).expect("temp dir");
    let witness = start_witness(&hosts.client);
    let kernel = test_guest().expect("guest").display().to_string();
    let primary_group = dir.join("primaries.sock").display().to_string();
    let backup_group = dir.join("backups.sock").display().to_string();
    let mut members = Vec::new();
    for (i, tap) in ["tapvm", "tapvm2"].into_iter().enumerate() {
        let ip = format!("192.168.249.{}", 21 + i);
        let backup_socket = dir.join(&format!("backup{i}.sock"));
        let backup = api_vmm(
            TIMEOUT,
            &format!("group_backup{i}"),
            &hosts.b,
            &backup_socket,
            &["-v"],
        );
        let url = format!("tcp:{HOST_B}:{}", 7100 + i);
        ok(
            ch_remote(
                &backup_socket,
                &[
                    "receive-ft",
                    &url,
                    "--group",
                    &backup_group,
                    "--tap",
                    tap,
                    "--witness",
                    &witness_addr(),
                ],
                None,
            ),
            "receive-ft",
        );
        let primary_socket = dir.join(&format!("primary{i}.sock"));
        let net = format!("tap={tap},mac=12:34:56:78:9a:b{i}");
        let cmdline = format!("workload=ft net.ip={ip}/24 ft.dirty_rate=2000");
        let args = guest_vm_args(&kernel, &cmdline, "size=64M", &net, &["-v"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let name = format!("group_primary{i}");
        let mut primary = api_vmm(TIMEOUT, &name, &hosts.a, &primary_socket, &args);
        primary
            .wait_for("ft: ready", TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        members.push(Member {
            primary,
            primary_socket,
            backup,
            backup_socket,
            ip,
        });
    }
    let witness_at = witness_addr();
    for (i, member) in members.iter().enumerate() {
        let peer = format!("{HOST_B}:{}", 7100 + i);
        ok(
            ch_remote(
                &member.primary_socket,
                &[
                    "enable-ft",
                    "--peer",
                    &peer,
                    "--group",
                    &primary_group,
                    "--witness",
                    &witness_at,
                    // Two guests spinning on two cores, four VMMs: generous.
                    "--heartbeat-timeout-ms",
                    "3000",
                ],
                None,
            ),
            "enable-ft",
        );
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let status = ft_status(&member.primary_socket);
            if status["health"] == "protected" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "member {i} never protected: {status}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let group = Group {
        hosts,
        _dir: dir,
        members,
        _witness: witness,
    };
    for member in &group.members {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let status = ft_status(&member.primary_socket);
            if status["group_members"] == 2 && status["health"] == "protected" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the group never had both members protected: {status}\n{}",
                group.diagnose()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    group
}

/// A client asking VM 1 directly, and one asking VM 1 to relay to VM 2.
fn start_loads(group: &Group) -> (Load, Load) {
    let (vm1, vm2) = (&group.members[0].ip, group.members[1].ip.clone());
    let direct = SeqClient::connect_to(&group.hosts.client, &format!("{vm1}:7000"))
        .unwrap_or_else(|e| panic!("{e}"));
    let relayed = SeqClient::connect_to(&group.hosts.client, &format!("{vm1}:7000"))
        .unwrap_or_else(|e| panic!("{e}"));
    let direct = Load::start(direct);
    let relayed = Load::start_with(relayed, move |c| c.relay(&vm2));
    (direct, relayed)
}

fn progress(load: &Load, what: &str, group: &Group) -> u64 {
    load.wait_progress(30, TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", group.diagnose()))
}

/// Both guests' own check of their memory pattern against their sequence.
fn check_guests(group: &Group) {
    for member in &group.members {
        let mut client = SeqClient::connect_to(&group.hosts.client, &format!("{}:7000", member.ip))
            .unwrap_or_else(|e| panic!("{e}"));
        let reply = client.command("check").unwrap_or_else(|e| panic!("{e}"));
        assert!(reply.starts_with("ok "), "{}: {reply}", member.ip);
    }
}

fn fail_over_the_group_when_one_primary_dies(tag: &str, victim: usize) {
    let _boot = kvm_serial_guard();
    let mut group = start_group(tag);
    let (direct, relayed) = start_loads(&group);
    progress(&direct, "direct", &group);
    let before = progress(&relayed, "relayed", &group);
    let status = ft_status(&group.members[1 - victim].primary_socket);
    assert!(status["group_epoch"].as_u64().unwrap_or(0) > 0, "{status}");
    // The coordinator orders the cuts; each member still copies most pages before its pause.
    for member in &group.members {
        let status = ft_status(&member.primary_socket);
        assert!(
            status["pages_staged_early"].as_u64().unwrap_or(0) > 0,
            "a group member staged nothing early: {status}"
        );
    }

    group.members[victim].primary.kill();
    let survivor = 1 - victim;
    let fenced = wait_status(
        &group.members[survivor].primary_socket,
        "health",
        &["fenced"],
        TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("the other primary: {e}\n{}", group.diagnose()));
    // Told by the coordinator; when that ran in the killed VMM, by the survivor taking the
    // role over, which saw the old one's process end (and so did not wait for the victim to
    // come back).
    let told = if victim == 0 {
        "ended with the group's old coordinator"
    } else {
        "lost"
    };
    assert!(
        fenced["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(told)),
        "{fenced}"
    );
    let mut epochs = Vec::new();
    let mut failover_ms = Vec::new();
    for member in &group.members {
        let status = wait_status(&member.backup_socket, "health", &["took_over"], TIMEOUT)
            .unwrap_or_else(|e| panic!("backup: {e}\n{}", group.diagnose()));
        epochs.push(status["group_epoch"].as_u64().unwrap_or(0));
        failover_ms.push(status["last_failover_ms"].as_u64().unwrap_or(0));
    }
    assert!(epochs[0] > 0 && epochs[0] == epochs[1], "{epochs:?}");
    let after = progress(&relayed, "relayed after the failover", &group);
    progress(&direct, "direct after the failover", &group);
    direct.stop().unwrap_or_else(|e| panic!("{e}"));
    relayed.stop().unwrap_or_else(|e| panic!("{e}"));
    check_guests(&group);
    report(&format!(
        "ft group: primary {victim} killed; both backups resumed group epoch {}; failover {failover_ms:?} ms; VM 2's seq via VM 1 went {before} -> {after} with no gap or repeat",
        epochs[0]
    ));
}

#[test]
fn the_creator_s_primary_dying_fails_over_the_whole_group_to_one_epoch() {
    require_kvm!();
    require_netns!();
    fail_over_the_group_when_one_primary_dies("gc", 0);
}

#[test]
fn another_member_s_primary_dying_fails_over_the_whole_group_to_one_epoch() {
    require_kvm!();
    require_netns!();
    fail_over_the_group_when_one_primary_dies("gm", 1);
}

#[test]
fn a_lost_backup_degrades_the_whole_group() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let mut group = start_group("gd");
    let (direct, relayed) = start_loads(&group);
    progress(&relayed, "relayed", &group);
    group.members[1].backup.kill();
    for member in &group.members {
        wait_status(&member.primary_socket, "health", &["degraded"], TIMEOUT)
            .unwrap_or_else(|e| panic!("primary: {e}\n{}", group.diagnose()));
    }
    // Told to stand down ("off"), or it found its primary's connection closed, asked the
    // witness and was refused ("failed"): either way it must not take over.
    wait_status(
        &group.members[0].backup_socket,
        "health",
        &["off", "failed"],
        TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("the other backup: {e}\n{}", group.diagnose()));
    progress(&relayed, "relayed after the loss", &group);
    progress(&direct, "direct after the loss", &group);
    direct.stop().unwrap_or_else(|e| panic!("{e}"));
    relayed.stop().unwrap_or_else(|e| panic!("{e}"));
    check_guests(&group);
    report("ft group: a backup killed; both primaries run on degraded, the other backup did not take over, both clients went on");
}

/// The member whose VMMs host both coordinators (it created the group on each side) leaves
/// on purpose: the roles pass to the other member's VMMs, which stay protected and go on
/// cutting and committing; a later death of that member's primary still fails the group over
/// to one group epoch, decided by the backups' new coordinator.
#[test]
fn the_creator_leaving_hands_the_group_on_and_a_later_death_still_fails_over_together() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let mut group = start_group("gl");
    let (direct, relayed) = start_loads(&group);
    progress(&relayed, "relayed", &group);
    ok(
        ch_remote(&group.members[0].primary_socket, &["disable-ft"], None),
        "disable-ft",
    );
    wait_status(
        &group.members[0].primary_socket,
        "health",
        &["off"],
        TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("the creator: {e}\n{}", group.diagnose()));
    wait_status(&group.members[0].backup_socket, "health", &["off"], TIMEOUT)
        .unwrap_or_else(|e| panic!("the creator's backup: {e}\n{}", group.diagnose()));
    // The other member is still protected, alone in the group, and its group epochs go on.
    let survivor = &group.members[1];
    let left_at = ft_status(&survivor.primary_socket)["group_epoch"]
        .as_u64()
        .unwrap_or(0);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let status = loop {
        let status = ft_status(&survivor.primary_socket);
        assert_eq!(
            status["health"],
            "protected",
            "{status}\n{}",
            group.diagnose()
        );
        if status["group_members"] == 1
            && status["group_epoch"].as_u64().unwrap_or(0) > left_at + 20
        {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the group stopped cutting after the creator left: {status}\n{}",
            group.diagnose()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let before = progress(&relayed, "relayed after the creator left", &group);
    progress(&direct, "direct after the creator left", &group);
    // VM 1 is outside the group now: it would see VM 2 silent through the failover for longer
    // than its relay waits, so the relay stops here and a client talks to VM 2 directly.
    relayed.stop().unwrap_or_else(|e| panic!("{e}"));
    let to_vm2 = SeqClient::connect_to(
        &group.hosts.client,
        &format!("{}:7000", group.members[1].ip),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let to_vm2 = Load::start(to_vm2);
    let seq_before = progress(&to_vm2, "VM 2 direct", &group);

    group.members[1].primary.kill();
    let took = wait_status(
        &group.members[1].backup_socket,
        "health",
        &["took_over"],
        TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("backup: {e}\n{}", group.diagnose()));
    let epoch = took["group_epoch"].as_u64().unwrap_or(0);
    assert!(
        epoch > left_at,
        "resumed group epoch {epoch}, the creator left at {left_at}: {took}"
    );
    let seq_after = progress(&to_vm2, "VM 2 direct after the failover", &group);
    progress(&direct, "VM 1 direct after the failover", &group);
    direct.stop().unwrap_or_else(|e| panic!("{e}"));
    to_vm2.stop().unwrap_or_else(|e| panic!("{e}"));
    check_guests(&group);
    report(&format!(
        "ft group: the creator left at group epoch {left_at} (the survivor reached {} alone, \
         VM 2 relayed {before}); the survivor's primary killed, its backup resumed group epoch \
         {epoch} through the backups' new coordinator; VM 2's seq went {seq_before} -> \
         {seq_after} on one connection with no gap or repeat",
        status["group_epoch"]
    ));
}
