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
-- Each version beside its model's baseline (rank 1), by window functions
-- over one scan (a self-join would scan the lake twice).
compared AS (
    SELECT v.*, e.latency_ms_edges AS edges,
           first_value(v.model_version) OVER baseline AS base_version,
           first_value(e.latency_ms_edges) OVER baseline AS base_edges,
           first_value(v.h) OVER baseline AS base_h,
           first_value(v.noise) OVER baseline AS base_noise
    FROM versions v
    JOIN histogram_edges e ON e.model_id = v.model_id AND e.model_version = v.model_version
    WINDOW baseline AS (PARTITION BY v.model_id ORDER BY v.rank)
)
SELECT model_id, model_version,
       'latency_p50_relative_to_' || base_version AS statistic,
       hist_quantile(edges, h, 0.5) / hist_quantile(base_edges, base_h, 0.5) - 1 AS value,
       normal_sf((hist_quantile(edges, h, 0.5) - hist_quantile(base_edges, base_h, 0.5))
                 / sqrt(power(hist_quantile_se(edges, h, 0.5, noise), 2)
                        + power(hist_quantile_se(base_edges, base_h, 0.5, base_noise), 2))) AS p_value,
       devices, events, epsilon
FROM compared
WHERE rank > 1
