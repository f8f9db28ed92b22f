-- name: latency_regression
-- description: Median latency of each model version (from its fleet latency histogram), current period against the reference period. value: relative increase of the median; p_value: one-sided z test whose standard errors include the events' spread and the privacy noise. The mean and the 95th percentile are reported beside it.
-- current: 15m
-- reference: 1h
-- threshold: 0.2 (20% slower)
-- alpha: 0.001
-- min_devices: 10
SELECT model_id, model_version,
       'latency_p50_relative_increase' AS statistic,
       cur_p50 / ref_p50 - 1 AS value,
       normal_sf((cur_p50 - ref_p50) / sqrt(cur_se * cur_se + ref_se * ref_se)) AS p_value,
       cur_p50, ref_p50,
       hist_quantile(edges, cur, 0.95) AS cur_p95,
       hist_quantile(edges, ref, 0.95) AS ref_p95,
       hist_mean(edges, cur) AS cur_mean,
       hist_mean(edges, ref) AS ref_mean,
       devices, events, epsilon
FROM (
    SELECT *,
           hist_quantile(edges, ref, 0.5) AS ref_p50,
           hist_quantile(edges, cur, 0.5) AS cur_p50,
           hist_quantile_se(edges, ref, 0.5, ref_noise) AS ref_se,
           hist_quantile_se(edges, cur, 0.5, cur_noise) AS cur_se
    FROM (
        SELECT s.*, e.latency_ms_edges AS edges
        FROM (
            SELECT model_id, model_version,
                   {ref_hist:latency_ms} AS ref,
                   {cur_hist:latency_ms} AS cur,
                   {ref_noise:latency_ms} AS ref_noise,
                   {cur_noise:latency_ms} AS cur_noise,
                   count(DISTINCT CASE WHEN {in_current} THEN device_id END) AS devices,
                   {cur_sum:inference_count} AS events,
                   max(epsilon) AS epsilon
            FROM metrics
            WHERE window_start >= {reference_start} AND window_start < {current_end}
            GROUP BY model_id, model_version
        ) s
        JOIN histogram_edges e ON e.model_id = s.model_id AND e.model_version = s.model_version
    )
)
