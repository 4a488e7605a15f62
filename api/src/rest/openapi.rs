//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` attributes and the
//! model's `ToSchema` derives. A test checks that it documents exactly the routes the router
//! serves.

use std::sync::OnceLock;

use utoipa::OpenApi;

use super::handlers;

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "vgpud",
        description = "Control plane of the vgpud mediated virtual GPU daemon. Errors are JSON \
                       `{code, message}`; see docs/api.md for the status-code policy.",
        license(name = "Apache-2.0 OR BSD-3-Clause")
    ),
    paths(
        handlers::get_gpu,
        handlers::list_profiles,
        handlers::list_vgpus,
        handlers::create_vgpu,
        handlers::get_vgpu,
        handlers::delete_vgpu,
        handlers::pause_vgpu,
        handlers::resume_vgpu,
        handlers::reset_vgpu,
        handlers::get_sched,
        handlers::put_sched,
        handlers::get_stats,
        handlers::list_stats,
        handlers::get_audit,
        handlers::get_display,
        handlers::list_engines,
        handlers::put_engine,
        handlers::get_trace,
        handlers::metrics,
        handlers::openapi,
        handlers::snapshot_vgpu,
        handlers::restore_vgpu,
        handlers::migrate_vgpu,
        handlers::start_incoming,
        handlers::list_migrations,
        handlers::get_migration,
        handlers::cancel_migration,
        handlers::set_dirty_log,
        handlers::take_dirty_log,
    ),
    tags(
        (name = "gpu", description = "The physical GPU, profiles and this document"),
        (name = "vgpus", description = "vGPU lifecycle and display"),
        (name = "scheduler", description = "Policies, weights, reserves, caps and the trace"),
        (name = "stats", description = "Counters, audit events and Prometheus metrics"),
        (name = "migration", description = "Snapshot, restore, live migration and the guest-RAM dirty log"),
    )
)]
pub struct ApiDoc;

/// The document as JSON (built once).
pub fn document_json() -> &'static [u8] {
    static DOC: OnceLock<Vec<u8>> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            .into_bytes()
    })
}
