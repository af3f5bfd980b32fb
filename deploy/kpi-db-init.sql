-- Demo target for docker-compose's kpi-db service: the app's vision_kpis table before the pipeline (no
-- foreign key on parent_kpi_id), 100 000 KPIs in complete 5-level trees (4 children per parent), and about
-- 1% orphans pointing at missing parents (three orphans per missing parent). The same shape as
-- devkit/app_db.py, written as plain SQL for docker-entrypoint-initdb.d.

CREATE TABLE public.vision_kpis (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid NOT NULL,
    vision_id     uuid NOT NULL,
    level         text NOT NULL CHECK (level IN ('yearly', 'quarterly', 'monthly', 'weekly', 'daily')),
    title         text NOT NULL,
    parent_kpi_id uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- 294 trees of 341 KPIs (1 + 4 + 16 + 64 + 256) = 100 254 rows.
INSERT INTO public.vision_kpis (id, user_id, vision_id, level, title, parent_kpi_id)
SELECT md5('kpi:' || depth || ':' || pos)::uuid,
       md5('user:' || (pos / (4 ^ depth)::int) % 1000)::uuid,
       md5('vision:' || pos / (4 ^ depth)::int)::uuid,
       (ARRAY['yearly', 'quarterly', 'monthly', 'weekly', 'daily'])[depth + 1],
       initcap((ARRAY['yearly', 'quarterly', 'monthly', 'weekly', 'daily'])[depth + 1]) || ' KPI ' || pos,
       CASE
         WHEN depth = 0 THEN NULL
         WHEN abs(hashint8(depth * 1000000 + pos)) % 1000 < 10
           THEN md5('ghost:' || (depth * 1000000 + pos) % 334)::uuid
         ELSE md5('kpi:' || (depth - 1) || ':' || pos / 4)::uuid
       END
FROM generate_series(0, 4) AS depth,
     LATERAL generate_series(0, 294 * (4 ^ depth)::int - 1) AS pos;

CREATE INDEX vision_kpis_user_vision_idx ON public.vision_kpis (user_id, vision_id);
CREATE INDEX vision_kpis_level_idx ON public.vision_kpis (vision_id, level);
ANALYZE public.vision_kpis;
