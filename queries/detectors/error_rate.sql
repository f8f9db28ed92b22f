-- name: error_rate
-- description: Share of inferences that failed, current period against the reference period. value: increase of the rate (absolute); p_value: one-sided two-proportion z test with the noise variance of both counts.
-- current: 15m
-- reference: 1h
-- threshold: 0.01 (one point of error rate)
-- alpha: 0.001
-- min_devices: 10
SELECT model_id, model_version,
       'error_rate_increase' AS statistic,
       CAST(cur_x AS DOUBLE) / cur_n - CAST(ref_x AS DOUBLE) / ref_n AS value,
       normal_sf(rate_z(ref_x, ref_n, ref_vx, ref_vn, cur_x, cur_n, cur_vx, cur_vn)) AS p_value,
       devices, cur_n AS events, epsilon
FROM (
    SELECT model_id, model_version,
           {ref_sum:error_count} AS ref_x, {ref_sum:inference_count} AS ref_n,
           {ref_noise:error_count} AS ref_vx, {ref_noise:inference_count} AS ref_vn,
           {cur_sum:error_count} AS cur_x, {cur_sum:inference_count} AS cur_n,
           {cur_noise:error_count} AS cur_vx, {cur_noise:inference_count} AS cur_vn,
           count(DISTINCT CASE WHEN {in_current} THEN device_id END) AS devices,
           max(epsilon) AS epsilon
    FROM metrics
    WHERE window_start >= {reference_start} AND window_start < {current_end}
    GROUP BY model_id, model_version
)
WHERE ref_n > 0 AND cur_n > 0
