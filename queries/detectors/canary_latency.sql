-- name: canary_latency
-- description: Staged rollout: median latency of each model version against the model's most used version, both over the current period (same devices' time, same conditions). value: relative difference of the medians; p_value: one-sided z test with spread and privacy noise.
-- current: 15m
-- reference: 15m (unused: both sides are in the current period)
-- threshold: 0.2 (20% slower than the baseline version)
-- alpha: 0.001
-- min_devices: 5
WITH versions AS (
    SELECT model_id, model_version,
           {cur_hist:latency_ms} AS h,
           {cur_noise:latency_ms} AS noise,
           count(DISTINCT device_id) AS devices,
           sum(inference_count) AS events,
           max(epsilon) AS epsilon,
           row_number() OVER (PARTITION BY model_id ORDER BY sum(inference_count) DESC, model_version) AS rank
    FROM metrics
    WHERE {in_current}
    GROUP BY model_id, model_version
),
with_edges AS (
    SELECT v.*, e.latency_ms_edges AS edges
    FROM versions v
    JOIN histogram_edges e ON e.model_id = v.model_id AND e.model_version = v.model_version
)
SELECT c.model_id, c.model_version,
       'latency_p50_relative_to_' || b.model_version AS statistic,
       hist_quantile(c.edges, c.h, 0.5) / hist_quantile(b.edges, b.h, 0.5) - 1 AS value,
       normal_sf((hist_quantile(c.edges, c.h, 0.5) - hist_quantile(b.edges, b.h, 0.5))
                 / sqrt(power(hist_quantile_se(c.edges, c.h, 0.5, c.noise), 2)
                        + power(hist_quantile_se(b.edges, b.h, 0.5, b.noise), 2))) AS p_value,
       c.devices, c.events, c.epsilon
FROM with_edges c JOIN with_edges b ON c.model_id = b.model_id AND b.rank = 1 AND c.rank > 1
