"""Marketing: who the customers are and what to do about it.

Profiles and segments (``profiles``, ``clusters``, ``profile_report``), item audiences
(``audience``), A/B experiments (``assignment``, ``feedback``, ``statistics``,
``experiment_report``, ``simulation``), campaigns (``campaign_config``, ``campaigns``, ``outbox``)
and the HTTP routes the service mounts (``routes``).
Built on training's inference module (user vectors) and the features' user features; serving
imports this package, never the reverse.
"""
