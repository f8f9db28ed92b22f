-- name: prediction_drift
-- description: Prediction confidence (confidence histogram) of each model version, current period against the reference period. value: PSI; p_value: chi-square homogeneity test with the privacy noise in its variances.
-- current: 15m
-- reference: 1h
-- threshold: 0.1 (PSI over 0.1: a moderate shift)
-- alpha: 0.001
-- min_devices: 10
SELECT model_id, model_version,
       'psi_confidence' AS statistic,
       psi(ref, cur) AS value,
       hist_shift_pvalue(ref, cur, ref_noise, cur_noise) AS p_value,
       js_distance(ref, cur) AS js_distance,
       devices, events, epsilon
FROM (
    SELECT model_id, model_version,
           {ref_hist:confidence} AS ref,
           {cur_hist:confidence} AS cur,
           {ref_noise:confidence} AS ref_noise,
           {cur_noise:confidence} AS cur_noise,
           count(DISTINCT CASE WHEN {in_current} THEN device_id END) AS devices,
           {cur_sum:inference_count} AS events,
           max(epsilon) AS epsilon
    FROM metrics
    WHERE window_start >= {reference_start} AND window_start < {current_end}
    GROUP BY model_id, model_version
)
