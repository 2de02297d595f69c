//! Plots of step logs: batch composition over time (stacked prefill and decode tokens per
//! step; total with its mean), KV usage and queue depth. SVG through plotters; PNG by
//! rasterising that SVG with resvg.

use crate::engine::steplog::StepRecord;
use plotters::prelude::*;
use std::path::Path;

/// Draws one column of panels per log.
pub fn composition_svg(logs: &[(String, Vec<StepRecord>)]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let width = 900 * logs.len() as u32;
        let root = SVGBackend::with_string(&mut svg, (width, 720)).into_drawing_area();
        root.fill(&WHITE)?;
        let cols = root.split_evenly((1, logs.len()));
        for ((name, steps), area) in logs.iter().zip(cols) {
            let (top, rest) = area.split_vertically(380);
            let (mid, bottom) = rest.split_vertically(170);
            let n = steps.len().max(1) as u64;
            let max_tok = steps.iter().map(|s| s.total_tokens()).max().unwrap_or(1).max(1) as f64 * 1.1;
            let mean = steps.iter().map(|s| s.total_tokens() as f64).sum::<f64>() / n as f64;
            let mut c = ChartBuilder::on(&top)
                .caption(format!("{name}: tokens per step"), ("sans-serif", 18))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(50)
                .build_cartesian_2d(0u64..n, 0f64..max_tok)?;
            c.configure_mesh().x_desc("step").y_desc("tokens").light_line_style(WHITE).draw()?;
            let blue = RGBColor(66, 110, 190);
            let orange = RGBColor(240, 150, 40);
            c.draw_series(steps.iter().enumerate().map(|(i, s)| {
                Rectangle::new([(i as u64, 0.0), (i as u64 + 1, s.prefill_tokens as f64)], blue.filled())
            }))?
            .label("prefill")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], blue.filled()));
            c.draw_series(steps.iter().enumerate().map(|(i, s)| {
                Rectangle::new(
                    [(i as u64, s.prefill_tokens as f64), (i as u64 + 1, s.total_tokens() as f64)],
                    orange.filled(),
                )
            }))?
            .label("decode")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], orange.filled()));
            c.draw_series(LineSeries::new([(0, mean), (n, mean)], BLACK.stroke_width(2)))?
                .label(format!("mean total {mean:.0}"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(2)));
            c.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;

            let mut k = ChartBuilder::on(&mid)
                .caption("KV cache usage (%)", ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(24)
                .y_label_area_size(50)
                .build_cartesian_2d(0u64..n, 0f64..100.0)?;
            k.configure_mesh().light_line_style(WHITE).draw()?;
            k.draw_series(AreaSeries::new(
                steps
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i as u64, 100.0 * s.kv_blocks_used as f64 / s.kv_blocks_total.max(1) as f64)),
                0.0,
                RGBColor(90, 170, 90).mix(0.5),
            ))?;

            let qmax = steps.iter().map(|s| s.num_waiting.max(s.num_running)).max().unwrap_or(1).max(1) as f64 * 1.1;
            let mut q = ChartBuilder::on(&bottom)
                .caption("running and waiting requests", ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(50)
                .build_cartesian_2d(0u64..n, 0f64..qmax)?;
            q.configure_mesh().x_desc("step").light_line_style(WHITE).draw()?;
            q.draw_series(LineSeries::new(
                steps.iter().enumerate().map(|(i, s)| (i as u64, s.num_running as f64)),
                blue.stroke_width(2),
            ))?
            .label("running")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], blue.stroke_width(2)));
            q.draw_series(LineSeries::new(
                steps.iter().enumerate().map(|(i, s)| (i as u64, s.num_waiting as f64)),
                RED.stroke_width(2),
            ))?
            .label("waiting")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], RED.stroke_width(2)));
            q.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// A line chart: several named series of (x, y) points.
pub fn lines_svg(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (820, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let pts = series.iter().flat_map(|s| s.1.iter());
        let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if !x0.is_finite() {
            (x0, x1) = (0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, 0f64..(y1 * 1.1).max(1e-9))?;
        c.configure_mesh().x_desc(x_desc).y_desc(y_desc).light_line_style(WHITE).draw()?;
        for (i, (name, s)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            c.draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2)));
            c.draw_series(s.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        c.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Writes `svg` to `path` as SVG, or as PNG when the extension says so.
pub fn write(svg: &str, path: &Path) -> anyhow::Result<()> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_lowercase).as_deref() {
        Some("svg") => std::fs::write(path, svg).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display())),
        Some("png") => {
            let mut opt = resvg::usvg::Options::default();
            let db = opt.fontdb_mut();
            db.load_system_fonts();
            // Generic families default to fonts that may be absent (Arial); map them to one
            // that is installed.
            let family = db
                .faces()
                .flat_map(|f| f.families.iter().map(|(n, _)| n.clone()))
                .find(|n| n == "DejaVu Sans")
                .or_else(|| db.faces().next().and_then(|f| f.families.first().map(|(n, _)| n.clone())));
            match family {
                Some(f) => {
                    db.set_sans_serif_family(f.clone());
                    db.set_serif_family(f);
                }
                None => eprintln!("warning: no system fonts found; the PNG will have no text (the SVG has it)"),
            }
            let tree = resvg::usvg::Tree::from_str(svg, &opt)?;
            let size = tree.size().to_int_size();
            let mut pm = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
                .ok_or_else(|| anyhow::anyhow!("empty plot"))?;
            resvg::render(&tree, resvg::tiny_skia::Transform::identity(), &mut pm.as_mut());
            pm.save_png(path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
        }
        _ => anyhow::bail!("{}: plots are written as .svg or .png", path.display()),
    }
}
