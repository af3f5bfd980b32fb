import { foreignKey, index, pgTable, text, timestamp, uuid } from "drizzle-orm/pg-core";

// vision_kpis: the KPI hierarchy (yearly -> quarterly -> monthly -> weekly -> daily).
export const visionKpis = pgTable(
  "vision_kpis",
  {
    id: uuid("id").primaryKey().defaultRandom(),
    userId: uuid("user_id").notNull(),
    visionId: uuid("vision_id").notNull(),
    level: text("level", { enum: ["yearly", "quarterly", "monthly", "weekly", "daily"] }).notNull(),
    title: text("title").notNull(),
    parentKpiId: uuid("parent_kpi_id"),
    createdAt: timestamp("created_at", { withTimezone: true }).notNull().defaultNow(),
    updatedAt: timestamp("updated_at", { withTimezone: true }).notNull().defaultNow(),
  },
  (table) => [
    index("vision_kpis_user_vision_idx").on(table.userId, table.visionId),
    index("vision_kpis_level_idx").on(table.visionId, table.level),
    // kpi-fk-maintenance: begin. On live databases the pipeline (DAG vision_kpis_parent_fk) creates these two
    // without stalling the app; they are declared here, by the same names, so drizzle-kit sees no drift.
    // Never `.references(() => visionKpis.id)`: drizzle-kit names that key
    // vision_kpis_parent_kpi_id_vision_kpis_id_fk, and push would drop ours and add its own, validated, in
    // one scan under a lock that stalls every write.
    index("vision_kpis_parent_kpi_idx").on(table.parentKpiId),
    foreignKey({
      name: "vision_kpis_parent_kpi_id_fkey",
      columns: [table.parentKpiId],
      foreignColumns: [table.id],
    }).onDelete("set null"),
    // kpi-fk-maintenance: end
  ],
);
