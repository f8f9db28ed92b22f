-- `privacy`: what each device's numbers are worth. One row per device,
-- model version and privacy configuration it published under (a device
-- that changed its configuration has a row for each), with the guarantee
-- its messages declare: the mechanism and per-window figures, the most
-- events a window counts, and the device-day `(epsilon, delta)`. Messages
-- from agents that predate the device-day fields show nulls there.
CREATE VIEW privacy AS
SELECT fleet, device_id, model_id, model_version, mechanism,
       epsilon AS epsilon_per_window, rho AS rho_per_window, delta,
       max_events_per_window, device_day_epsilon, device_day_delta,
       window_secs,
       count(*) AS windows,
       min(window_start) AS first_window_start,
       max(window_start) AS last_window_start
FROM metrics
GROUP BY fleet, device_id, model_id, model_version, mechanism, epsilon, rho, delta,
         max_events_per_window, device_day_epsilon, device_day_delta, window_secs
