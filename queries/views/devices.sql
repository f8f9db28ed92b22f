-- `devices`: one row per device seen in `metrics` or `status`: its last
-- status (online, or offline from its last will), when it was last heard
-- from, its agent and model versions and its privacy budget.
--
-- `metrics` is first reduced to one row per device, model and version,
-- so the list of model versions is built from those few rows instead of
-- from every window (4.8x faster on 10 M rows, BENCHMARKS.md).
CREATE VIEW devices AS
WITH per_model AS (
    SELECT device_id, model_id, model_version,
           max(fleet) AS fleet,
           max(received_at) AS last_seen,
           max(window_start) AS last_window_start,
           count(*) AS windows,
           max(agent_version) AS agent_version
    FROM metrics GROUP BY device_id, model_id, model_version
), seen AS (
    SELECT device_id,
           max(fleet) AS fleet,
           max(last_seen) AS last_seen,
           max(last_window_start) AS last_window_start,
           sum(windows) AS windows,
           array_to_string(array_sort(array_agg(model_id || '@' || model_version)), ',') AS model_versions,
           max(agent_version) AS agent_version
    FROM per_model GROUP BY device_id
), last_status AS (
    SELECT * FROM (
        SELECT *, row_number() OVER (PARTITION BY device_id ORDER BY at DESC, received_at DESC) AS rn
        FROM status
    ) WHERE rn = 1
)
SELECT coalesce(s.device_id, l.device_id) AS device_id,
       coalesce(s.fleet, l.fleet) AS fleet,
       coalesce(l.state, 'unknown') AS state,
       l.at AS state_since,
       CASE WHEN s.last_seen IS NULL THEN l.received_at
            WHEN l.received_at IS NULL THEN s.last_seen
            ELSE greatest(s.last_seen, l.received_at) END AS last_seen,
       s.last_window_start,
       coalesce(s.windows, 0) AS windows,
       coalesce(l.agent_version, s.agent_version) AS agent_version,
       coalesce(s.model_versions, l.models) AS model_versions,
       l.budget_remaining_rho,
       l.budget_remaining_epsilon,
       coalesce(l.budget_exhausted, false) AS budget_exhausted,
       l.buffered_windows,
       l.lost_windows
FROM seen s FULL OUTER JOIN last_status l ON s.device_id = l.device_id
