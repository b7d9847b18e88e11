//! A stand-in segmenter for orchestrator-bench's `--masks room`: NOT a model. It knows the layout of
//! `synthetic_room` (a wall over a floor, a sofa in front) and answers "wall", "floor" and "sofa" with that surface
//! as ONE instance each, the way a real SAM3 answers them on such a photo: a 288x288 probability mask over the whole
//! image (SAM3's mask size), saturated inside and out, soft only across the one model pixel an edge passes through,
//! and a tight box. The bundled random-weights model instead returns soft noise over the whole frame for every
//! concept, which makes every region, rule and stored mask of the bench as large and as incompressible as they can
//! be; this mode measures the orchestrator on masks shaped like a real model's. Its own work (decoding the photo,
//! drawing three masks) runs in the bench's process like the real segmenter's and is counted the same way.

use palette_proto::segmenter::v1::segmenter_server::{Segmenter, SegmenterServer};
use palette_proto::segmenter::v1::{
    Box as PixelBox, ConceptResult, GetModelInfoRequest, Instance, ModelInfo, SegmentRequest,
    SegmentResponse, Tensor, image::Source,
};
use tonic::{Request, Response, Status};

/// SAM3's mask resolution.
const MASK: u32 = 288;
const MODEL_ID: &str = "room-stand-in";

/// The stand-in, serving on 127.0.0.1 until `stop`.
pub struct RoomSegmenter {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RoomSegmenter {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

pub async fn start() -> RoomSegmenter {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(
            "palette.segmenter.v1.Segmenter",
            tonic_health::ServingStatus::Serving,
        )
        .await;
    let server = SegmenterServer::new(Service).max_decoding_message_size(256 << 20);
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(server)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    RoomSegmenter {
        url,
        stop: Some(stop),
        task,
    }
}

struct Service;

#[tonic::async_trait]
impl Segmenter for Service {
    async fn segment(
        &self,
        request: Request<SegmentRequest>,
    ) -> Result<Response<SegmentResponse>, Status> {
        let req = request.into_inner();
        let photo = match req.image.and_then(|i| i.source) {
            Some(Source::Encoded(bytes)) => image::load_from_memory(&bytes)
                .map_err(|e| Status::invalid_argument(e.to_string()))?
                .into_rgb8(),
            Some(Source::Rgb(rgb)) => image::RgbImage::from_raw(rgb.width, rgb.height, rgb.data)
                .ok_or_else(|| Status::invalid_argument("rgb: data is not width x height x 3"))?,
            None => return Err(Status::invalid_argument("no image")),
        };
        let layout = Layout::of(&photo);
        let concepts = req
            .concepts
            .iter()
            .map(|concept| ConceptResult {
                concept: concept.clone(),
                presence_score: 0.95,
                instances: layout
                    .surface(concept)
                    .map(|surface| layout.instance(surface))
                    .into_iter()
                    .collect(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(SegmentResponse {
            concepts,
            image_width: photo.width(),
            image_height: photo.height(),
            mask_width: MASK,
            mask_height: MASK,
            model_id: MODEL_ID.into(),
            ..Default::default()
        }))
    }

    async fn get_model_info(
        &self,
        _: Request<GetModelInfoRequest>,
    ) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(ModelInfo {
            model_id: MODEL_ID.into(),
            mask_size: MASK,
            ..Default::default()
        }))
    }

    /// A segmenter from before CheckConcepts: callers accept the phrases and let Segment judge them.
    async fn check_concepts(
        &self,
        _: Request<palette_proto::segmenter::v1::CheckConceptsRequest>,
    ) -> Result<Response<palette_proto::segmenter::v1::CheckConceptsResponse>, Status> {
        Err(Status::unimplemented("CheckConcepts"))
    }
}

/// An axis-aligned rectangle in photo pixels (x0 <= x < x1, y0 <= y < y1).
#[derive(Clone, Copy)]
struct Rect {
    x0: f32,
    y0: f32,
    x1: f32,
    y1: f32,
}

impl Rect {
    /// The fraction of the cell [cx0, cx1) x [cy0, cy1) this rectangle covers.
    fn coverage(&self, cx0: f32, cy0: f32, cx1: f32, cy1: f32) -> f32 {
        let ox = (self.x1.min(cx1) - self.x0.max(cx0)).max(0.0);
        let oy = (self.y1.min(cy1) - self.y0.max(cy0)).max(0.0);
        ox * oy / ((cx1 - cx0) * (cy1 - cy0))
    }

    fn intersect(&self, other: &Rect) -> Rect {
        Rect {
            x0: self.x0.max(other.x0),
            y0: self.y0.max(other.y0),
            x1: self.x1.min(other.x1).max(self.x0.max(other.x0)),
            y1: self.y1.min(other.y1).max(self.y0.max(other.y0)),
        }
    }
}

#[derive(Clone, Copy)]
enum Surface {
    Wall,
    Floor,
    Sofa,
}

/// Where `synthetic_room` put the wall, the floor and the sofa in this photo.
struct Layout {
    w: f32,
    h: f32,
    sofa: Rect,
}

impl Layout {
    /// The sofa's left edge moves with the photo's seed: found on the row through it as the first blue pixel
    /// (the sofa is [40.., 60, 110], wall and floor are not bluer than red by 30).
    fn of(photo: &image::RgbImage) -> Self {
        let (w, h) = photo.dimensions();
        let y = h * 13 / 20;
        let left = (0..w)
            .find(|&x| {
                let [r, _, b] = photo.get_pixel(x, y).0;
                i32::from(b) > i32::from(r) + 30
            })
            .unwrap_or(w / 4);
        Layout {
            w: w as f32,
            h: h as f32,
            sofa: Rect {
                x0: left as f32,
                y0: (h / 2 + 1) as f32,
                x1: (w * 3 / 4) as f32,
                y1: (h * 4 / 5) as f32,
            },
        }
    }

    fn surface(&self, concept: &str) -> Option<Surface> {
        match concept {
            c if c.contains("wall") => Some(Surface::Wall),
            c if c.contains("floor") => Some(Surface::Floor),
            c if c.contains("sofa") || c.contains("couch") => Some(Surface::Sofa),
            _ => None,
        }
    }

    /// The surface's band before the sofa is cut out of it.
    fn band(&self, surface: Surface) -> Rect {
        let split = (self.h * 3.0 / 5.0).ceil();
        match surface {
            Surface::Wall => Rect {
                x0: 0.0,
                y0: 0.0,
                x1: self.w,
                y1: split,
            },
            Surface::Floor => Rect {
                x0: 0.0,
                y0: split,
                x1: self.w,
                y1: self.h,
            },
            Surface::Sofa => self.sofa,
        }
    }

    fn instance(&self, surface: Surface) -> Instance {
        let band = self.band(surface);
        // The sofa stands in front of the wall and the floor: their masks have a hole where it is.
        let hole = match surface {
            Surface::Sofa => None,
            _ => Some(band.intersect(&self.sofa)),
        };
        let (sx, sy) = (self.w / MASK as f32, self.h / MASK as f32);
        let data = (0..MASK * MASK)
            .map(|i| {
                let (cx0, cy0) = ((i % MASK) as f32 * sx, (i / MASK) as f32 * sy);
                let (cx1, cy1) = (cx0 + sx, cy0 + sy);
                let inside = band.coverage(cx0, cy0, cx1, cy1);
                let cut = hole.map_or(0.0, |r| r.coverage(cx0, cy0, cx1, cy1));
                ((inside - cut).max(0.0) * 255.0).round() as u8
            })
            .collect();
        Instance {
            score: 0.9,
            r#box: Some(PixelBox {
                x0: band.x0,
                y0: band.y0,
                x1: band.x1,
                y1: band.y1,
            }),
            mask: Some(Tensor {
                shape: vec![MASK, MASK],
                dtype: 1,
                data,
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probs(instance: &Instance) -> &[u8] {
        &instance.mask.as_ref().unwrap().data
    }

    #[test]
    fn the_three_surfaces_tile_the_room_with_one_soft_model_pixel_at_each_edge() {
        let jpeg = crate::synthetic_room(1008, 756, 7);
        let photo = image::load_from_memory(&jpeg).unwrap().into_rgb8();
        let layout = Layout::of(&photo);
        // The sofa starts after w/4 + seed % 50 (JPEG may blur the edge by a pixel).
        assert!(
            (layout.sofa.x0 - (252.0 + 8.0)).abs() <= 2.0,
            "{}",
            layout.sofa.x0
        );
        let [wall, floor, sofa] =
            [Surface::Wall, Surface::Floor, Surface::Sofa].map(|s| layout.instance(s));
        let mut soft = 0;
        for i in 0..(MASK * MASK) as usize {
            let sum: u32 = [&wall, &floor, &sofa]
                .iter()
                .map(|m| u32::from(probs(m)[i]))
                .sum();
            assert!((253..=257).contains(&sum), "model pixel {i}: {sum}");
            soft += [&wall, &floor, &sofa]
                .iter()
                .filter(|m| !matches!(probs(m)[i], 0 | 255))
                .count();
        }
        // Edges: the wall/floor line across the width, the sofa's outline; a few hundred soft model pixels of 83k.
        assert!(soft > 288 && soft < 6 * 288, "{soft}");
        // Saturated inside: top left is wall, bottom left floor, the sofa's centre sofa.
        assert_eq!(probs(&wall)[0], 255);
        assert_eq!(probs(&floor)[(MASK * MASK - MASK) as usize], 255);
        let centre = (MASK * 2 / 3 * MASK + MASK / 2) as usize;
        assert_eq!((probs(&sofa)[centre], probs(&wall)[centre]), (255, 0));
    }
}
