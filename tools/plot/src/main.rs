//! Draws kvm-dirty-shim's benchmark figures from the CSV files the
//! benchmarks write, with plotters:
//!
//!     cargo run --release --manifest-path tools/plot/Cargo.toml -- round-cost doc/round-cost.csv doc/round-cost.png
//!     cargo run --release --manifest-path tools/plot/Cargo.toml -- migration doc/migration.csv doc/migration.png
//!     cargo run --release --manifest-path tools/plot/Cargo.toml -- scale doc/migration-scale.csv doc/migration-scale.png
//!
//! `round-cost`: `examples/bench.rs rounds` (ms per migration round against
//! guest memory, ring and bitmap, log-log). `migration`:
//! `examples/migration-bench.py` (median total time and downtime per
//! configuration, one panel per guest size and dirty rate). `scale`:
//! `examples/migration-bench.py --matrix scale` (median ms per dirty sync
//! and tracking CPU ms per sync against guest memory, one line per
//! configuration, log-log).
//! Text is drawn with DejaVu Sans (Debian's fonts-dejavu-core), read at run
//! time.

use std::collections::BTreeMap;
use std::error::Error;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

type Res<T> = Result<T, Box<dyn Error>>;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const BLUE: RGBColor = RGBColor(0, 90, 200);
const ORANGE: RGBColor = RGBColor(220, 90, 0);

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let font =
        std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (apt install fonts-dejavu-core)"))?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "DejaVuSans.ttf is not a font")?;
    match args.get(1..).unwrap_or_default() {
        [what, csv, png] if what == "round-cost" => round_cost(csv, png),
        [what, csv, png] if what == "migration" => migration(csv, png),
        [what, csv, png] if what == "scale" => scale(csv, png),
        _ => Err("usage: kds-plot round-cost|migration|scale IN.csv OUT.png".into()),
    }
}

/// The CSV's comment lines (`# ...`, the title) and its rows, header first.
fn read_csv(path: &str) -> Res<(String, Vec<Vec<String>>)> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut title = String::new();
    let mut rows = Vec::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("# ") {
            title = c.to_string();
        } else if !line.trim().is_empty() {
            rows.push(line.split(',').map(|f| f.trim().to_string()).collect());
        }
    }
    if rows.len() < 2 {
        return Err(format!("{path}: no rows").into());
    }
    Ok((title, rows))
}

fn col(header: &[String], name: &str) -> Res<usize> {
    header
        .iter()
        .position(|h| h == name)
        .ok_or_else(|| format!("no column {name}").into())
}

/// ms per migration round against guest memory, log-log.
fn round_cost(csv: &str, png: &str) -> Res<()> {
    let (title, rows) = read_csv(csv)?;
    let (b, r, m) = (
        col(&rows[0], "guest_bytes")?,
        col(&rows[0], "ring_ms")?,
        col(&rows[0], "bitmap_ms")?,
    );
    let mut pts: Vec<(f64, f64, f64)> = Vec::new();
    for row in &rows[1..] {
        pts.push((row[b].parse()?, row[r].parse()?, row[m].parse()?));
    }
    let (x0, x1) = (pts[0].0, pts[pts.len() - 1].0);
    let ymax = pts.iter().map(|p| p.1.max(p.2)).fold(0.0, f64::max) * 1.5;
    let ymin = pts.iter().map(|p| p.1.min(p.2)).fold(f64::MAX, f64::min) / 1.5;

    let xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    let ys: Vec<f64> = [0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0]
        .into_iter()
        .filter(|&y| y >= ymin && y <= ymax)
        .collect();
    let root = BitMapBackend::new(png, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, foot) = root.split_vertically(570);
    let mut chart = ChartBuilder::on(&plot)
        .caption(
            "One migration round: reap + sync of the slot",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x0 / 1.2..x1 * 1.2).log_scale().with_key_points(xs),
            (ymin..ymax).log_scale().with_key_points(ys),
        )?;
    chart
        .configure_mesh()
        .x_desc("guest memory")
        .y_desc("ms per round")
        .x_label_formatter(&|x| {
            let mib = (*x / (1u64 << 20) as f64).round() as u64;
            if mib >= 1024 {
                format!("{} GiB", mib / 1024)
            } else {
                format!("{mib} MiB")
            }
        })
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;
    for (name, color, f) in [("ring", BLUE, 1usize), ("bitmap", ORANGE, 2)] {
        let line: Vec<(f64, f64)> = pts
            .iter()
            .map(|p| (p.0, if f == 1 { p.1 } else { p.2 }))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(3)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    foot.draw(&Text::new(title, (16, 6), ("sans-serif", 13)))?;
    root.present()?;
    println!("wrote {png}");
    Ok(())
}

/// Per configuration, against guest memory (log-log): the median dirty
/// sync's duration (left) and the tracking CPU per sync (right).
fn scale(csv: &str, png: &str) -> Res<()> {
    let (title, rows) = read_csv(csv)?;
    let (g, c) = (col(&rows[0], "guest_mib")?, col(&rows[0], "config")?);
    let panels = [
        ("sync_ms", "ms per dirty sync"),
        ("tracking_ms_per_sync", "tracking CPU ms per sync"),
    ];
    let colors = [ORANGE, RGBColor(120, 120, 120), BLUE, RGBColor(0, 150, 80)];
    let root = BitMapBackend::new(png, (1200, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, foot) = root.split_vertically(530);
    let halves = plot.split_evenly((1, 2));
    for ((field, label), area) in panels.iter().zip(halves.iter()) {
        let f = col(&rows[0], field)?;
        // config -> [(guest bytes, value)], in the CSV's order.
        let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for row in &rows[1..] {
            // Suffixed configurations are earlier sittings or builds: in
            // the table, not in the plot (as for the heavy matrix).
            if row[c].contains(" (") {
                continue;
            }
            let (Ok(mib), Ok(v)) = (row[g].parse::<f64>(), row[f].parse::<f64>()) else {
                continue;
            };
            let pt = (mib * (1u64 << 20) as f64, v.max(1e-3));
            match lines.iter_mut().find(|(n, _)| *n == row[c]) {
                Some((_, pts)) => pts.push(pt),
                None => lines.push((row[c].clone(), vec![pt])),
            }
        }
        let all: Vec<(f64, f64)> = lines.iter().flat_map(|(_, p)| p.iter().copied()).collect();
        if all.is_empty() {
            continue;
        }
        let x0 = all.iter().map(|p| p.0).fold(f64::MAX, f64::min);
        let x1 = all.iter().map(|p| p.0).fold(0.0, f64::max);
        let y0 = all.iter().map(|p| p.1).fold(f64::MAX, f64::min) / 1.5;
        let y1 = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.5;
        let mut xs: Vec<f64> = all.iter().map(|p| p.0).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        let mut chart = ChartBuilder::on(area)
            .caption(*label, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (x0 / 1.5..x1 * 1.5).log_scale().with_key_points(xs),
                (y0..y1).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("guest memory")
            .y_desc(*label)
            .x_label_formatter(&|x| human((*x / (1u64 << 20) as f64).round() as u64))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .draw()?;
        for (i, (name, pts)) in lines.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .draw()?;
    }
    foot.draw(&Text::new(title, (16, 6), ("sans-serif", 13)))?;
    root.present()?;
    println!("wrote {png}");
    Ok(())
}

/// One bar of a migration panel: configuration, "completed/runs", total s,
/// downtime ms.
type Bar = (String, String, f64, f64);

/// Median total time and downtime per configuration: one panel per (guest
/// size, dirty rate); bars for total time, a dot for downtime; a cross
/// where the migration did not complete in time.
fn migration(csv: &str, png: &str) -> Res<()> {
    let (title, rows) = read_csv(csv)?;
    let h = &rows[0];
    // The paced matrix has a dirty rate per panel; the heavy one (no rate
    // column) a guest and a vCPU count.
    let heavy = col(h, "rate").is_err();
    let c_size = col(h, if heavy { "guest_mib" } else { "guest" })?;
    let c_cfg = col(h, "config")?;
    let panel_label = |row: &[String]| -> Res<String> {
        Ok(if heavy {
            format!(
                "{}, {} vCPUs, unpaced",
                row[col(h, "guest")?],
                row[col(h, "vcpus")?]
            )
        } else {
            format!("{} dirty rate", row[col(h, "rate")?])
        })
    };
    let (c_done, c_total, c_down) = (
        col(h, "completed")?,
        col(h, "total_s")?,
        col(h, "downtime_ms")?,
    );
    // panel -> [(config, completed runs / runs, total s, downtime ms)]
    let mut panels: BTreeMap<(u64, String), Vec<Bar>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for row in &rows[1..] {
        // The heavy matrix keeps an earlier build's runs beside, named
        // "config (build)": in its table, not in the plot.
        if heavy && row[c_cfg].contains(" (") {
            continue;
        }
        let size: u64 = row[c_size].trim_end_matches(" MiB").parse().unwrap_or(0);
        let total = row[c_total].parse().unwrap_or(f64::NAN);
        let down = row[c_down].parse().unwrap_or(f64::NAN);
        if !order.contains(&row[c_cfg]) {
            order.push(row[c_cfg].clone());
        }
        panels.entry((size, panel_label(row)?)).or_default().push((
            row[c_cfg].clone(),
            row[c_done].clone(),
            total,
            down,
        ));
    }
    let n = panels.len();
    let cols = 2usize.min(n);
    let nrows = n.div_ceil(cols);
    let root = BitMapBackend::new(png, (1200, 380 * nrows as u32 + 60)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(40);
    top.draw(&Text::new(
        "Live migration through the shim against stock QEMU: median total time (bars) and downtime (dots)",
        (12, 10),
        ("sans-serif", 18),
    ))?;
    let (body, foot) = body.split_vertically(380 * nrows as u32);
    foot.draw(&Text::new(title, (12, 2), ("sans-serif", 12)))?;
    for (area, ((size, rate), cells)) in body.split_evenly((nrows, cols)).iter().zip(&panels) {
        let tmax = cells
            .iter()
            .map(|c| c.2)
            .filter(|t| t.is_finite())
            .fold(1.0, f64::max)
            * 1.2;
        let dmax = cells
            .iter()
            .map(|c| c.3)
            .filter(|t| t.is_finite())
            .fold(100.0, f64::max)
            * 1.2;
        let k = order.len();
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{} guest, {rate}", human(*size)),
                ("sans-serif", 17),
            )
            .margin(12)
            .x_label_area_size(70)
            .y_label_area_size(55)
            .right_y_label_area_size(60)
            .build_cartesian_2d(0f64..k as f64, 0f64..tmax)?
            // Integer milliseconds: plotters 0.3.7 ignores a label formatter
            // on a secondary f64 axis.
            .set_secondary_coord(0f64..k as f64, 0i64..dmax.ceil() as i64);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(k * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 && i < order.len() {
                    order[i]
                        .replace("patched ", "shim ")
                        .replace(" + dirty-limit", "+limit")
                        .replace(" + auto-converge", "+AC")
                } else {
                    String::new()
                }
            })
            .x_label_style(("sans-serif", 12))
            .y_desc("total time (s)")
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc("downtime (ms)")
            .draw()?;
        for (i, name) in order.iter().enumerate() {
            let Some(c) = cells.iter().find(|c| &c.0 == name) else {
                continue;
            };
            let x = i as f64;
            if c.2.is_finite() {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(x + 0.2, 0.0), (x + 0.8, c.2)],
                    BLUE.mix(0.7).filled(),
                )))?;
            }
            if c.3.is_finite() {
                chart.draw_secondary_series(std::iter::once(Circle::new(
                    (x + 0.5, c.3.round() as i64),
                    6,
                    ORANGE.filled(),
                )))?;
            }
            if c.1.starts_with("0/") {
                chart.draw_series(std::iter::once(Cross::new(
                    (x + 0.5, tmax * 0.05),
                    8,
                    RED.stroke_width(3),
                )))?;
            }
            chart.draw_series(std::iter::once(Text::new(
                format!("{} done", c.1),
                (x + 0.3, tmax * 0.95),
                ("sans-serif", 12),
            )))?;
        }
    }
    root.present()?;
    println!("wrote {png}");
    Ok(())
}

fn human(mib: u64) -> String {
    if mib >= 1024 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}
