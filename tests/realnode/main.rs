//! The real-node tier: nodemesh installed the way a user installs it, on a
//! real kubelet + containerd + CNI node (`nodemesh_tests::realnode`),
//! running the real images (`cargo xtask image`). Needs root.
//!
//! One story, told in order (each step needs the ones before): install;
//! a labelled namespace's Deployments captured with no restart; identities
//! on both sides; Services through kube-proxy, from unmeshed and meshed
//! clients; a Job in a meshed namespace runs to completion; a deleted pod
//! is released; `rollout restart` of the agent never lets a meshed
//! connection bypass the mesh; and every documented way to uninstall leaves
//! no program attached and nothing pinned.
mod story;

fn main() {
    nodemesh_tests::harness::main(nodemesh_tests::trials![
        story::nodemesh_runs_on_a_real_node_as_installed,
    ]);
}
