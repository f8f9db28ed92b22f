-- name: custom_drift
-- description: Each custom feature's histogram (the app's own numeric inputs, `custom.*`) of each model version, current period against the reference period; one evaluation per feature. value: PSI; p_value: chi-square homogeneity test with the privacy noise of each bucket.
-- current: 15m
-- reference: 1h
-- threshold: 0.1 (PSI over 0.1: a moderate shift)
-- alpha: 0.001
-- min_devices: 10
SELECT model_id, model_version,
       'psi_custom.' || feature AS statistic,
       custom_psi(ref, cur, feature) AS value,
       custom_shift_pvalue(ref, cur, feature, ref_noise, cur_noise) AS p_value,
       custom_js_distance(ref, cur, feature) AS js_distance,
       devices, events, epsilon
FROM (
    SELECT *, unnest(custom_features(ref, cur)) AS feature
    FROM (
        SELECT model_id, model_version,
               custom_sum(CASE WHEN {in_reference} THEN custom END) AS ref,
               custom_sum(CASE WHEN {in_current} THEN custom END) AS cur,
               custom_noise(CASE WHEN {in_reference} THEN mechanism END, noise_scale) AS ref_noise,
               custom_noise(CASE WHEN {in_current} THEN mechanism END, noise_scale) AS cur_noise,
               count(DISTINCT CASE WHEN {in_current} THEN device_id END) AS devices,
               {cur_sum:inference_count} AS events,
               max(epsilon) AS epsilon
        FROM metrics
        WHERE window_start >= {reference_start} AND window_start < {current_end}
        GROUP BY model_id, model_version
    )
)
