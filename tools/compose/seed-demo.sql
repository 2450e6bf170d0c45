-- The demo table the DAGs' defaults point at (pg_demo: public.activities, created_at, month), created once when
-- the pg-primary volume is first initialised (docker-entrypoint-initdb.d runs it in the `demo` database).
-- The same shape as tools' seed_activities (the public_activity gem's schema): 200,000 rows over the last 26
-- months, created_at rising with id, a few percent out of order, a YAML-ish parameters blob.
-- tests/dags/test_compose.py runs this file against a real PostgreSQL and converts the result.
CREATE TABLE IF NOT EXISTS public.activities (
    id bigserial PRIMARY KEY,
    trackable_type varchar, trackable_id bigint,
    owner_type varchar, owner_id bigint,
    key varchar, parameters text,
    recipient_type varchar, recipient_id bigint,
    created_at timestamp NOT NULL, updated_at timestamp NOT NULL
);

INSERT INTO public.activities (trackable_type, trackable_id, owner_type, owner_id, key, parameters,
                               recipient_type, recipient_id, created_at, updated_at)
SELECT (ARRAY['Applicant','Job','Interview','Offer','Note'])[1 + mod(g, 5)],
       mod(g * 7919, 5000000),
       'User', mod(g * 104729, 20000),
       (ARRAY['applicant.create','applicant.update','interview.schedule','offer.send','note.create'])[1 + mod(g / 3, 5)],
       concat(E'---\nstage: ', mod(g, 7), E'\nfrom_stage: ', mod(g + 3, 7), E'\nscore: ', mod(g, 100),
              E'\nsource: careers_page\ncomment: "', md5(g::text), md5((g + 1)::text), E'"\n'),
       'Company', mod(g, 3000),
       ts, ts + mod(g, 600) * interval '1 second'
FROM (SELECT g, (now() AT TIME ZONE 'UTC') - interval '26 months'
                + (g - 1)::float8 / 200000 * interval '26 months'
                - CASE WHEN mod(g, 23) = 0 THEN interval '3 hours' ELSE interval '0' END AS ts
      FROM generate_series(1, 200000::bigint) g) s
WHERE NOT EXISTS (SELECT FROM public.activities);

CREATE INDEX IF NOT EXISTS index_activities_on_trackable_type_and_trackable_id
    ON public.activities (trackable_type, trackable_id);
CREATE INDEX IF NOT EXISTS index_activities_on_owner_type_and_owner_id ON public.activities (owner_type, owner_id);
CREATE INDEX IF NOT EXISTS index_activities_on_recipient_type_and_recipient_id
    ON public.activities (recipient_type, recipient_id);
CREATE INDEX IF NOT EXISTS index_activities_on_created_at ON public.activities (created_at);
ANALYZE public.activities;
