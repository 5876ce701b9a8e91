"""Run inside Blender (3.x or 4.x) by ``render --renderer blender``; not importable outside Blender.

    blender -b --factory-startup -P blender_script.py -- SPEC.json

SPEC.json: ``{"object": path, "output_folder": dir, "resolution": int, "save_mesh": bool,
"views": [{"c2w": 4x4 Blender camera-to-world, "fov": radians}, ...]}``.

Implements reference DATA.md section 3: import (glTF with merged vertices and normals shading, OBJ,
PLY, STL, FBX, USD, OFF via a small reader, ``.blend`` opened with its hidden objects removed),
normalisation into [-0.5, 0.5]^3 (``scale = 1/max extent`` on a common root, then the centre offset),
the three lights, Cycles at 128 samples with a width-1 box filter, transparent film, RGBA PNGs, a
32 mm sensor with focal ``16 / tan(fov/2)``, ``transforms.json`` and, when asked, ``mesh.ply``
(all meshes triangulated, world coordinates, binary PLY).
"""

import json
import math
import os
import sys

import bpy  # noqa: I001  (only inside Blender)
from mathutils import Matrix, Vector

MAJOR = bpy.app.version[0]


def _clear_scene():
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj, do_unlink=True)
    for coll in (bpy.data.meshes, bpy.data.materials, bpy.data.lights, bpy.data.cameras):
        for item in list(coll):
            coll.remove(item)


def _import_off(path):
    with open(path) as f:
        tokens = [t for line in f for t in line.split("#")[0].split()]
    if not tokens or not tokens[0].endswith("OFF"):
        raise RuntimeError(f"not an OFF file: {path}")
    pos = 1
    nv, nf = int(tokens[pos]), int(tokens[pos + 1])
    pos += 3
    verts = [tuple(float(x) for x in tokens[pos + 3 * i: pos + 3 * i + 3]) for i in range(nv)]
    pos += 3 * nv
    faces = []
    for _ in range(nf):
        k = int(tokens[pos])
        faces.append(tuple(int(x) for x in tokens[pos + 1: pos + 1 + k]))
        pos += 1 + k
    mesh = bpy.data.meshes.new("off_mesh")
    mesh.from_pydata(verts, [], faces)
    obj = bpy.data.objects.new("off_object", mesh)
    bpy.context.scene.collection.objects.link(obj)


def _numpy_aliases_for_old_gltf_importer():
    """Blender 3.x's glTF importer uses ``np.bool``, removed in NumPy 1.24; distributions that run
    Blender on the system NumPy (Debian 12: Blender 3.4 + NumPy 1.24) need the alias back."""
    try:
        import numpy
    except ImportError:
        raise RuntimeError("Blender's glTF importer needs NumPy in Blender's Python "
                           "(Debian/Ubuntu: apt-get install python3-numpy)") from None
    if not hasattr(numpy, "bool"):
        numpy.bool = bool


def _import(path):
    ext = os.path.splitext(path)[1].lower()
    if ext == ".blend":
        bpy.ops.wm.open_mainfile(filepath=path)
        for obj in list(bpy.data.objects):
            if obj.hide_render or obj.hide_get():
                bpy.data.objects.remove(obj, do_unlink=True)
        for coll in list(bpy.data.collections):
            if coll.hide_render:
                bpy.data.collections.remove(coll)
        return
    if ext in (".glb", ".gltf"):
        _numpy_aliases_for_old_gltf_importer()
        bpy.ops.import_scene.gltf(filepath=path, merge_vertices=True, import_shading="NORMALS")
    elif ext == ".obj":
        if hasattr(bpy.ops.wm, "obj_import") and MAJOR >= 4:
            bpy.ops.wm.obj_import(filepath=path)
        else:
            bpy.ops.import_scene.obj(filepath=path)
    elif ext == ".ply":
        if MAJOR >= 4:
            bpy.ops.wm.ply_import(filepath=path)
        else:
            bpy.ops.import_mesh.ply(filepath=path)
    elif ext == ".stl":
        if MAJOR >= 4 and hasattr(bpy.ops.wm, "stl_import"):
            bpy.ops.wm.stl_import(filepath=path)
        else:
            bpy.ops.import_mesh.stl(filepath=path)
    elif ext == ".fbx":
        bpy.ops.import_scene.fbx(filepath=path)
    elif ext in (".usd", ".usda", ".usdc", ".usdz"):
        bpy.ops.wm.usd_import(filepath=path)
    elif ext == ".off":
        _import_off(path)
    else:
        raise RuntimeError(f"unsupported file type {ext}")


def _mesh_objects():
    return [o for o in bpy.context.scene.objects if o.type == "MESH"]


def _bbox():
    lo = Vector((math.inf,) * 3)
    hi = Vector((-math.inf,) * 3)
    meshes = _mesh_objects()
    if not meshes:
        raise RuntimeError("no mesh objects in the scene")
    for obj in meshes:
        for corner in obj.bound_box:
            p = obj.matrix_world @ Vector(corner)
            lo = Vector(min(a, b) for a, b in zip(lo, p))
            hi = Vector(max(a, b) for a, b in zip(hi, p))
    return lo, hi


def _normalise():
    roots = [o for o in bpy.context.scene.objects if o.parent is None]
    if len(roots) > 1:
        parent = bpy.data.objects.new("NormaliseRoot", None)
        bpy.context.scene.collection.objects.link(parent)
        for obj in roots:
            obj.parent = parent
        root = parent
    else:
        root = roots[0]
    lo, hi = _bbox()
    scale = 1.0 / max(hi - lo)
    root.scale = root.scale * scale
    bpy.context.view_layer.update()
    lo, hi = _bbox()
    offset = -(lo + hi) / 2
    root.matrix_world.translation += offset
    bpy.context.view_layer.update()
    return scale, offset


def _lights():
    for obj in [o for o in bpy.context.scene.objects if o.type == "LIGHT"]:
        bpy.data.objects.remove(obj, do_unlink=True)

    def add(name, kind, energy, location, scale=None):
        light = bpy.data.lights.new(name=name, type=kind)
        light.energy = energy
        obj = bpy.data.objects.new(name, light)
        obj.location = location
        if scale is not None:
            obj.scale = (scale, scale, scale)
        bpy.context.scene.collection.objects.link(obj)

    add("Point", "POINT", 1000, (4, 1, 6))
    add("Top", "AREA", 10000, (0, 0, 10), scale=100)
    add("Bottom", "AREA", 1000, (0, 0, -10))


def _render_settings(resolution):
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.render.resolution_x = resolution
    scene.render.resolution_y = resolution
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.image_settings.color_depth = "8"
    scene.render.film_transparent = True
    scene.cycles.samples = 128
    scene.cycles.filter_type = "BOX"
    scene.cycles.filter_width = 1
    scene.cycles.diffuse_bounces = 1
    scene.cycles.glossy_bounces = 1
    scene.cycles.transparent_max_bounces = 3
    scene.cycles.transmission_bounces = 3
    # Denoise as the original does, where this Blender build has OpenImageDenoise (Debian's does not).
    scene.cycles.use_denoising = bool(getattr(bpy.app.build_options, "openimagedenoise", False))
    prefs = bpy.context.preferences.addons["cycles"].preferences
    for kind in ("OPTIX", "CUDA", "HIP", "METAL"):
        try:
            prefs.compute_device_type = kind
        except TypeError:  # this build lacks the backend
            continue
        prefs.get_devices()
        if any(d.type == kind for d in prefs.devices):
            for d in prefs.devices:
                d.use = d.type == kind
            scene.cycles.device = "GPU"
            break


def _camera():
    cam_data = bpy.data.cameras.new("Camera")
    cam_data.sensor_fit = "AUTO"
    cam_data.sensor_width = 32
    cam_data.sensor_height = 32
    cam = bpy.data.objects.new("Camera", cam_data)
    bpy.context.scene.collection.objects.link(cam)
    bpy.context.scene.camera = cam
    return cam


def _export_mesh(path):
    import bmesh

    bpy.ops.object.select_all(action="DESELECT")
    for obj in bpy.context.scene.objects:
        obj.hide_set(False)
        obj.hide_viewport = False
    for obj in [o for o in bpy.context.scene.objects if o.type in ("CURVE", "SURFACE", "META", "FONT")]:
        bpy.context.view_layer.objects.active = obj
        obj.select_set(True)
        bpy.ops.object.convert(target="MESH")
        obj.select_set(False)
    for obj in _mesh_objects():
        bm = bmesh.new()
        bm.from_mesh(obj.data)
        bmesh.ops.triangulate(bm, faces=bm.faces[:], quad_method="BEAUTY", ngon_method="BEAUTY")
        bm.to_mesh(obj.data)
        bm.free()
        obj.select_set(True)
    if MAJOR >= 4:
        bpy.ops.wm.ply_export(filepath=path, ascii_format=False, export_selected_objects=False,
                              apply_modifiers=True, global_scale=1.0, forward_axis="Y", up_axis="Z")
    else:
        bpy.ops.export_mesh.ply(filepath=path, use_ascii=False, use_selection=False, use_mesh_modifiers=True,
                                axis_forward="Y", axis_up="Z", global_scale=1.0)


def main():
    spec_path = sys.argv[sys.argv.index("--") + 1]
    with open(spec_path) as f:
        spec = json.load(f)
    out = spec["output_folder"]
    _clear_scene()
    _import(spec["object"])
    scale, offset = _normalise()
    _lights()
    _render_settings(int(spec["resolution"]))
    cam = _camera()
    frames = []
    for i, view in enumerate(spec["views"]):
        cam.matrix_world = Matrix(view["c2w"])
        cam.data.lens = 16.0 / math.tan(view["fov"] / 2)
        bpy.context.scene.render.filepath = os.path.join(out, f"{i:03d}.png")
        bpy.ops.render.render(write_still=True)
        bpy.context.view_layer.update()
        frames.append({"file_path": f"{i:03d}.png", "camera_angle_x": view["fov"],
                       "transform_matrix": [list(row) for row in cam.matrix_world]})
    if spec.get("save_mesh"):
        _export_mesh(os.path.join(out, "mesh.ply"))
    result = {"aabb": [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]], "scale": scale, "offset": list(offset),
              "frames": frames}
    tmp = os.path.join(out, "transforms.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=4)
    os.replace(tmp, os.path.join(out, "transforms.json"))


if __name__ == "__main__":
    main()
