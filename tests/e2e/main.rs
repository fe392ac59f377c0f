//! End-to-end tests: real eBPF, real network namespaces as pods, real
//! sockets, the real agent. Needs root (CI runs as root).
mod api;
mod audit;
mod escape;
mod inbound;
mod isolation;
mod kube;
mod mesh;
mod operate;
mod protocols;
mod requests;
mod services;
mod skeleton;
mod transparency;

fn main() {
    nodemesh_tests::harness::main(nodemesh_tests::trials![
        audit::the_agents_own_ports_are_never_a_destination,
        audit::every_address_of_a_pod_is_captured,
        audit::a_node_gets_only_its_meshed_pods_identities,
        audit::connections_from_before_capture_are_decided_at_capture,
        audit::a_cluster_ip_the_agent_does_not_know_is_refused,
        audit::a_mistyped_policy_annotation_means_deny,
        audit::the_install_floor_is_what_annotations_cannot_open,
        audit::a_tunnel_connection_takes_no_stream_past_its_certificate,
        audit::every_handshake_settles_on_the_post_quantum_hybrid,
        audit::a_node_vouches_only_for_its_own_pods,
        audit::an_upgraded_connection_is_decided_again_on_a_policy_change,
        audit::probes_get_one_answer_and_floods_one_log_line,
        audit::only_the_node_itself_gets_through_to_probe_ports,
        audit::a_policy_names_the_pods_it_selects_but_cannot_protect,
        audit::the_issuers_key_is_never_in_the_install_output,
        audit::a_container_with_a_netns_of_its_own_is_never_the_pod,
        audit::pods_netns_are_found_among_the_runtimes_by_address,
        escape::ipv6_and_ipv4_mapped_connections_are_tunnelled,
        escape::a_new_pods_first_connection_is_never_in_the_clear,
        escape::a_connection_to_port_15001_elsewhere_is_tunnelled,
        escape::a_pod_whose_capture_fails_is_refused_and_gets_an_event,
        isolation::idle_connections_from_outside_fill_only_their_share,
        isolation::a_short_soak_leaves_nothing_open,
        inbound::the_app_sees_its_client_and_plaintext_is_captured,
        inbound::all_authenticated_refuses_plaintext_and_changes_apply_live,
        inbound::without_an_agent_inbound_fails_closed_and_a_new_one_takes_over,
        inbound::an_authorization_policy_lets_in_only_whom_it_names,
        inbound::requests_are_measured_at_the_servers_edge_and_refused_with_403,
        inbound::a_new_connection_per_request_leaves_the_servers_ports_alone,
        kube::a_labelled_pod_is_captured_from_the_api,
        operate::stat_shows_what_the_agents_saw,
        operate::tap_shows_live_requests_with_both_identities,
        operate::the_dashboard_shows_live_numbers_in_a_real_browser,
        api::stat_and_tap_go_through_the_api_server_as_rbac_allows,
        kube::a_namespace_label_meshes_its_pods_and_the_opt_out_wins,
        kube::unlabelling_releases_and_deleting_cleans_up,
        kube::bad_pods_are_reported_once_retried_and_the_rest_served,
        kube::the_service_index_follows_services_and_slices,
        kube::the_api_server_going_away_loses_nothing,
        kube::install_manifests_apply_and_grant_discovery_what_it_needs,
        mesh::cross_node_traffic_is_encrypted_and_carries_identities,
        mesh::the_identity_service_signs_only_for_pods_on_the_agents_node,
        mesh::the_tunnel_refuses_bad_peers_and_keeps_serving,
        mesh::certificates_rotate_under_a_long_lived_stream,
        protocols::http_and_grpc_apps_pass_through_the_mesh,
        requests::requests_to_a_service_are_balanced_one_by_one_across_nodes,
        requests::real_clients_half_close_and_prefer_the_healthy_endpoint_on_their_node,
        requests::grpc_upgrades_and_large_uploads_pass_through_a_service,
        requests::a_server_first_protocol_never_waits_for_detection,
        requests::mariadb_is_never_held_by_detection,
        requests::configuration_overrides_detection_live,
        services::connections_to_a_cluster_ip_are_balanced_over_endpoints_on_both_nodes,
        services::unmeshed_endpoints_are_plain_and_no_endpoints_is_a_reset,
        skeleton::meshed_pod_goes_through_the_agent,
        skeleton::unmeshed_pod_is_left_alone,
        skeleton::labelling_captures_and_unlabelling_releases_live,
        skeleton::fast_path_carries_the_bytes_when_on_and_not_when_off,
        skeleton::agent_upstream_connections_are_never_redirected,
        skeleton::bypassed_destinations_go_direct,
        skeleton::pods_that_cannot_be_captured_are_reported_and_retried,
        skeleton::a_malformed_pod_file_keeps_the_last_good_pods,
        skeleton::unreachable_destinations_reset_the_client,
        skeleton::a_restarted_agent_takes_over_without_bypass,
        skeleton::cleanup_on_exit_removes_everything,
        skeleton::bad_configuration_is_reported_all_at_once,
        skeleton::a_hybrid_hosts_cgroup_mount_as_root_is_followed_to_its_v2_hierarchy,
        transparency::an_ordinary_blocking_client_works_with_the_default_settings,
        transparency::iperf3_bulk_passes_with_the_default_settings,
        transparency::a_dying_agent_resets_what_it_carries_and_new_connections_fail_closed,
        transparency::an_agent_under_a_low_open_file_limit_serves_many_connections,
    ]);
}
